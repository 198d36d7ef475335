"""The per-epoch plan and the step of a distillation run: epoch ``e`` replays view ``e mod V`` (or a fresh
augmentation); each step applies the view to the batch's images, picks the teachers, runs the method, steps the
discriminators, and returns the student's named losses for the loop to backpropagate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from meal_cache.distill.config import DistillConfig
from meal_cache.distill.feed import interleaved
from meal_cache.distill.methods.adversarial import AdversarialMethod
from meal_cache.engine.distributed import World
from meal_cache.engine.loop import StepOutput, Stream, epoch_generator
from meal_cache.views import augment
from meal_cache.views.mixing import mixed_labels

if TYPE_CHECKING:
    from meal_cache.distill.built_run import DistillRun


def _selection(config: DistillConfig, teachers: list[str], generator: torch.Generator) -> list[str]:
    if config.teacher_selection == "random":
        return [teachers[int(torch.randint(len(teachers), (1,), generator=generator))]]
    return list(teachers)


class DistillEpochs:
    """The per-epoch plan and the step of a distillation run: epoch ``e`` replays view ``e mod V`` (or a fresh
    augmentation), and each step applies the view to the batch's images, picks the teachers, runs the distiller,
    steps the discriminators, and returns the student's named losses for the loop to backpropagate."""

    def __init__(self, run: DistillRun) -> None:
        self.run = run
        self.chooser: torch.Generator | None = None
        # The run's step (epochs before this one included, so a resumed run counts as the uninterrupted one did):
        # it paces the gradient-norm diagnostics.
        self.steps = 0

    def view(self, epoch: int) -> int:
        return self.run.views[epoch % len(self.run.views)]

    def epoch_views(self, epoch: int) -> list[int]:
        return epoch_views(self.run, epoch)

    def record_fields(self, epoch: int) -> dict:
        divergent = self.run.divergent
        extra = {} if divergent is None else {"divergent_view": divergent.views[epoch % len(divergent.views)],
                                              "divergent_batches": divergent.per_epoch}  # fmt: skip
        if self.run.dense is not None:
            return {"view": "dense", **extra}
        if self.run.config.fresh_views:
            return {"view": "fresh", **extra}
        views = self.epoch_views(epoch)
        return {"view": views[0] if len(views) == 1 else views, **extra}

    def batches(self, epoch: int) -> Iterator[tuple[tuple[torch.Tensor, dict | None, augment.ViewParams | None],
                                                    torch.Tensor]]:  # fmt: skip
        """The epoch's batches (:func:`replay_batches`), with the epoch's teacher choice and the method told
        the epoch first."""
        self.chooser = epoch_generator(self.run.config.seed, epoch, Stream.TEACHER_CHOICE)
        self.steps = epoch * self.run.schedule.steps
        self.run.distiller.set_epoch(epoch)
        return replay_batches(self.run, epoch)

    def step(self, batch: tuple[tuple, torch.Tensor]) -> StepOutput:
        """One step on a batch of :meth:`batches`."""
        run, world, distiller = self.run, self.run.world, self.run.distiller
        (rows, targets, mixed), pixels = batch
        rows_dev = rows.to(run.device, non_blocking=True)
        inputs = augment.normalise(pixels, run.dataset.mean, run.dataset.std, run.precision.channels_last)
        selected = _selection(run.config, distiller.teachers, self.chooser)
        if run.online is not None:
            targets = run.online.targets(pixels, selected)
        labels = run.labels[rows_dev]
        hard_targets = hard_labels(run.labels, labels, mixed, run.dataset.num_classes)
        method_batch = distiller.batch(inputs, targets, hard_targets, selected, run.run_student)
        own_stats = distiller.own_step(method_batch, run.own_optimizers)
        with run.precision.autocast():
            out = distiller(method_batch)
        out.stats.update(own_stats)
        if isinstance(distiller, AdversarialMethod):
            distiller.play(out, run.disc_optimizer, world, run.precision.autocast)
        # The families' norms need a backward pass each (the step's own backward sums them), so they are taken
        # only every --grad-norm-every steps, and never by default.
        every = run.config.grad_norm_every
        if every and self.steps % every == 0 and not world.enabled:
            out.stats.update(gradient_norms(out.losses, distiller.student_parameters()))
        self.steps += 1
        return StepOutput(out.logits, labels, out.losses, out.stats)


def epoch_views(replay, epoch: int) -> list[int]:
    """The views epoch ``epoch`` replays: view ``e mod V``, or with K crops per image views ``eK .. eK+K-1``
    (mod V); ``replay`` is a :class:`~meal_cache.distill.run.DistillRun` or anything with its replay fields."""
    crops = replay.config.crops_per_image
    return [replay.views[(epoch * crops + j) % len(replay.views)] for j in range(crops)]


def replay_batches(replay, epoch: int) -> Iterator[tuple[tuple[torch.Tensor, dict | None,
                                                               augment.ViewParams | None], torch.Tensor]]:  # fmt: skip
    """Epoch ``epoch``'s ``((rows, targets, mixed), pixels)``: rows and targets from the store's batch source
    (a dense store's derived for the epoch's fresh crops), the pixels of those rows in this epoch's view from the
    image source, and the rows' view parameters when the view mixes rows (None otherwise). Under torchrun each
    rank asks only for its share of every batch, so it decodes only its own rows. ``replay`` is a
    :class:`~meal_cache.distill.run.DistillRun`, or anything with its replay fields (config, world, store,
    dataset, images, source, views, view_params, recipe, sizes, dense, divergent, schedule): the public
    :class:`~meal_cache.cached_views.CachedViews` is one."""
    config, world = replay.config, replay.world
    views = epoch_views(replay, epoch)
    if config.fresh_views or replay.dense is not None:
        # A dense store's crops are drawn like fresh views, one draw per crop of an image.
        generator = epoch_generator(config.seed, epoch, Stream.FRESH_VIEWS)
        draws = config.crops_per_image if replay.dense is not None else 1
        params = [augment.draw(replay.recipe, replay.sizes, generator, replay.store.policy, replay.store.mixing,
                               replay.dataset.image_size) for _ in range(draws)]  # fmt: skip
    else:
        params = [replay.view_params(view) for view in views]
    last = epoch + 1 >= config.epochs
    if config.crops_per_image > 1:
        batches = replay.source.epoch(epoch, views, None if last else epoch_views(replay, epoch + 1))
    else:
        following = None if last else epoch_views(replay, epoch + 1)[0]
        batches = ((rows, targets, None) for rows, targets in replay.source.epoch(epoch, views[0], following))

    def requests() -> Iterator[tuple[torch.Tensor, augment.ViewParams, tuple]]:
        for rows, targets, crop in batches:
            rows, targets, crop = _rank_share(world, rows, targets, crop)
            rows_params = _crop_params(params, rows, crop)
            if replay.dense is not None and targets is not None:  # the maps' boxes of these crops
                targets = replay.dense(targets, rows_params, replay.sizes[rows])
            # Mixed rows' hard labels are mixed with the same lambda (the pixels are mixed by the source).
            yield rows, rows_params, (rows, targets, rows_params if rows_params.mix_partner is not None else None)

    natural = replay.images.pixels(requests())
    if replay.divergent is None:
        return natural

    def divergent() -> Iterator:
        for rows, targets, pixels in replay.divergent.epoch(epoch):
            rows, targets, pixels = _rank_share(world, rows, targets, pixels)
            yield (rows, targets, None), pixels

    natural_steps = replay.schedule.steps - replay.divergent.per_epoch
    return interleaved(natural, divergent(), natural_steps, replay.divergent.per_epoch)


def hard_labels(every_label: torch.Tensor, labels: torch.Tensor, mixed: augment.ViewParams | None,
                num_classes: int) -> torch.Tensor:  # fmt: skip
    """A batch's hard targets: its ``labels`` (class indices), or where its view mixes rows (``mixed``, the rows'
    parameters) class shares mixed with each partner's label (from ``every_label``) by the row's lambda."""
    if mixed is None:
        return labels
    partners = every_label[mixed.mix_partner.to(every_label.device, non_blocking=True).long()]
    return mixed_labels(labels, mixed, num_classes, partners)


def _rank_share(world: World, rows: torch.Tensor, targets: dict | None, extra: torch.Tensor | None):
    """This rank's share of a global batch under torchrun (every ``world.size``-th sample from its rank): the rows,
    their targets and one more per-sample tensor (or None); the whole batch outside torchrun."""
    if not world.enabled:
        return rows, targets, extra
    share = slice(world.rank, None, world.size)
    targets = targets and {key: value[share] for key, value in targets.items()}
    return rows[share], targets, None if extra is None else extra[share]


LOSS_FAMILIES = {"soft": "soft", "hard": "hard", "sim/": "sim", "adv/": "adv", "joint/": "adv"}


def gradient_norms(named: dict[str, torch.Tensor], params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The L2 norm of the gradient each loss family (soft labels, hard labels, block similarity, adversarial)
    sends into ``params``, as ``grad/FAMILY``: which part of the loss actually moves the student. The graph is
    kept for the step's own backward pass."""
    families: dict[str, torch.Tensor] = {}
    for name, loss in named.items():
        # A method's own loss (FitNet's hint, AT's attention) is a family of its own, named by its first part.
        family = next((f for prefix, f in LOSS_FAMILIES.items() if name.startswith(prefix)), name.split("/")[0])
        families[family] = families[family] + loss if family in families else loss
    norms = {}
    for family, loss in families.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[f"grad/{family}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
    return norms


def _crop_params(params: list[augment.ViewParams], rows: torch.Tensor, crop: torch.Tensor | None) -> augment.ViewParams:
    """Each sample's parameters: of the one view, or of view ``crop[i]`` of ``params`` for sample ``i``."""
    if crop is None:
        return params[0][rows]
    return augment.stack_views(params, crop, rows)
