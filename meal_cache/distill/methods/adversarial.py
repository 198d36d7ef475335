"""The adversarial game of MEAL's family and AFD: discriminators that tell teacher (real) from student (fake)
representations, their step, and the student's losses for fooling them.

A method that plays it subclasses :class:`AdversarialMethod`, puts its discriminators in ``self.discriminators``
and returns an :class:`AdversarialOutput` whose ``adversarial`` list holds each discriminator's inputs of the
step; the distillation step then calls :meth:`AdversarialMethod.play`. The game's knobs are the options of these
methods alone (:class:`GameOptions`, ``--method-option adv_weight=0.3`` or its flag ``--adv-weight 0.3``); the other
methods refuse them. Imports :mod:`meal_cache.distill.methods.base`, the losses and the loop's number check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from meal_cache import losses
from meal_cache.distill.methods.base import Method, MethodOutput, MethodSettings
from meal_cache.engine.loop import check_number
from meal_cache.errors import unknown_choice

if TYPE_CHECKING:
    from meal_cache.engine.distributed import World
    from meal_cache.store.teacher_store import TeacherStore

DISCRIMINATORS = ("blocks", "output")
# meal-cache: one discriminator per (teacher, block), MLP or conv with one score, softened probabilities to the
# output one; reference: MEAL's reference code, one per layer shared by the teachers, its 1x1-conv stack with a
# 2-way output, raw logits to the output one (docs/design.md, "What MEAL's reference code does").
DISC_FORMS = ("meal-cache", "reference")
# How the discriminators are trained. "adversarial": their own Adam step on detached student features, then the
# student's loss for fooling them (a GAN game). "joint": MEAL's reference code, whose discriminator loss is added
# to the student's loss on one optimiser with gradient reversal off, so the student also lowers it.
ADV_GAMES = ("adversarial", "joint")
# The knobs only the game reads (its players' options; discriminators and disc_form are the MEAL family's): a method
# that does not play it refuses them when given, naming their flags.
GAME_SETTINGS = ("adv_weight", "adv_loss", "adv_game", "disc_lr", "disc_form", "discriminators")


@dataclass(frozen=True)
class GameOptions:
    """The adversarial game's options, shared by its players (MEAL's family, AFD), each also a flag of its own
    (``--adv-weight``): ``adv_weight``, the weight of each adversarial loss; ``adv_loss``, bce or ls (least
    squares); ``adv_game``, one of :data:`ADV_GAMES`; ``disc_lr``, the discriminators' Adam rate (with the joint
    game their share of the student's SGD, at disc_lr / lr of its scheduled rate)."""

    adv_weight: float = 0.1
    adv_loss: str = "bce"
    adv_game: str = "adversarial"
    disc_lr: float = 2e-4


def check_game(options: GameOptions) -> None:
    """The game's choices and numbers, named by their flags as before they were options."""
    if options.adv_game not in ADV_GAMES:
        raise unknown_choice("adversarial game", options.adv_game, ADV_GAMES)
    if options.adv_loss not in losses.ADVERSARIAL:
        raise unknown_choice("adversarial loss", options.adv_loss, list(losses.ADVERSARIAL))
    check_number("adv_weight", options.adv_weight, low=0.0)
    check_number("disc_lr", options.disc_lr, low=0.0, low_open=True)


def game_options(options: Any) -> dict[str, Any]:
    """The game's knobs of a player's options, by name (what its run records)."""
    names = [f.name for f in dataclasses.fields(GameOptions)]
    return {name: getattr(options, name) for name in names}


class AdversarialInput(NamedTuple):
    """One discriminator's input of a step: teacher (real) and student (fake) representations, and the weight of
    the student's adversarial loss on it."""

    key: str
    real: torch.Tensor
    fake: torch.Tensor
    weight: float


@dataclass
class AdversarialOutput(MethodOutput):
    """A :class:`~meal_cache.distill.methods.base.MethodOutput` with the discriminators' inputs of the step."""

    adversarial: list[AdversarialInput] = field(default_factory=list)


class AdversarialMethod(Method):
    """A method with discriminators: the base of MEAL's family and of AFD. Subclasses add their discriminators to
    ``self.discriminators`` (an output discriminator is named by ``"output"`` in ``--discriminators``). Their
    options hold :class:`GameOptions`' knobs."""

    own_discriminators: ClassVar[tuple[str, ...]] = ()  # of DISCRIMINATORS, where --discriminators is not given
    Options: ClassVar[type] = GameOptions

    def __init__(self, student: nn.Module, config: MethodSettings, store: TeacherStore, image_size: int) -> None:
        super().__init__(student, config, store, image_size)
        self.discriminators = nn.ModuleDict()

    @classmethod
    def check_options(cls, options: Any) -> None:
        check_game(options)

    @classmethod
    def output_discriminator(cls, options: Any) -> bool:
        """Whether a run with these options trains a discriminator on the output (at a weight above 0)."""
        return "output" in (getattr(options, "discriminators", None) or ()) and options.adv_weight > 0

    @classmethod
    def trains_discriminators(cls, options: Any) -> bool:
        """Whether a run with these (resolved) options trains any discriminator, so reads the game's knobs."""
        return True

    @classmethod
    def recorded_options(cls, config: MethodSettings) -> dict[str, Any]:
        """The options given, and every knob of the game where the run plays it (resolved: a record says the game
        it played whatever the defaults become)."""
        options = cls.options_of(config)
        recorded = super().recorded_options(config)
        return {**recorded, **game_options(options)} if cls.trains_discriminators(options) else recorded

    @classmethod
    def sampled_logits_refusal(cls, config: MethodSettings) -> str | None:
        if cls.output_discriminator(cls.options_of(config)):
            return ("the output discriminator would learn count histograms as the teachers' outputs (--discriminators "
                    "without output, or --adv-weight 0, leaves it out)")  # fmt: skip
        return super().sampled_logits_refusal(config)

    @classmethod
    def has_a_loss(cls, config: MethodSettings) -> bool:
        return super().has_a_loss(config) or cls.output_discriminator(cls.options_of(config))

    def play(
        self,
        out: AdversarialOutput,
        optimizer: torch.optim.Optimizer | None,
        world: World | None,
        autocast: Callable[[], AbstractContextManager],
    ) -> None:
        """The game's part of a step, after :meth:`forward`, into ``out``'s losses and stats. ``--adv-game joint``:
        the discriminators' losses join the student's (the one backward pass trains both). Otherwise the
        discriminators take their own step on detached student features (``optimizer``; gradients averaged over
        ranks under torchrun), then the student's losses for fooling the updated discriminators are added.
        ``autocast`` is the run's mixed-precision context, which the student's losses are formed in."""
        if self.options.adv_game == "joint":
            with autocast():
                joint, stats = self.joint_losses(out.adversarial)
            out.losses.update(joint)
            out.stats.update(stats)
            return
        if optimizer is not None:
            out.stats.update(self.discriminator_step(out.adversarial, optimizer, world))
        with autocast():
            out.losses.update(self.adversarial_losses(out.adversarial))

    def adversarial_losses(self, inputs: list[AdversarialInput]) -> dict[str, torch.Tensor]:
        """The student's losses for fooling each discriminator (taken after the discriminators' step, so the
        student plays against their updated weights)."""
        named: dict[str, torch.Tensor] = {}
        for item in inputs:
            loss = losses.generator_loss(self.options.adv_loss, self.discriminators[item.key](item.fake))
            _accumulate(named, f"adv/{item.key}", self.options.adv_weight * item.weight * loss)
        return named

    def joint_losses(self, inputs: list[AdversarialInput]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``--adv-game joint`` (MEAL's reference code): each discriminator's own loss on teacher (real) against
        student (fake, not detached) features, weighted as :meth:`adversarial_losses` weighs the student's, and
        added to the student's loss; one backward pass trains both. Returns the losses and the logged stats."""
        named: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for item in inputs:
            loss = self._discriminate(item.key, item.real, item.fake, stats)
            _accumulate(named, f"joint/{item.key}", self.options.adv_weight * item.weight * loss)
        return named, stats

    def discriminator_step(
        self, inputs: list[AdversarialInput], optimizer: torch.optim.Optimizer, world: World | None = None
    ) -> dict[str, torch.Tensor]:
        """One step of every discriminator on teacher (real) against detached student (fake) features
        (gradients averaged over ranks under ``torchrun``)."""
        if not inputs:
            return {}
        total = 0.0
        stats: dict[str, torch.Tensor] = {}
        for disc_key, real, fake, _ in inputs:
            total = total + self._discriminate(disc_key, real, fake.detach(), stats)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if world is not None:
            world.average_gradients(self.discriminators.parameters())
        optimizer.step()
        return stats

    def _discriminate(self, key: str, real: torch.Tensor, fake: torch.Tensor, stats: dict) -> torch.Tensor:
        """Discriminator ``key``'s loss on teacher (real, detached) against student (fake, as given) features;
        its loss and accuracy are logged into ``stats``."""
        real_scores, fake_scores = self.discriminators[key](real.detach()), self.discriminators[key](fake)
        loss = losses.discriminator_loss(self.options.adv_loss, real_scores, fake_scores)
        stats[f"disc/{key}"] = loss.detach()
        stats[f"disc_acc/{key}"] = losses.discriminator_accuracy(real_scores, fake_scores, self.options.adv_loss)
        return loss


def plays_the_game(method: type[Method]) -> bool:
    """Whether ``method`` trains discriminators (reads the game's settings)."""
    return issubclass(method, AdversarialMethod)


def _accumulate(named: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    named[name] = named[name] + value if name in named else value
