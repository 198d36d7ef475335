"""Hand computations for the method-settings tests: each paper's formula written out in float64, apart from the
losses module, and the inputs those tests share (two teachers that disagree, mixed hard labels, the student's
block outputs as its forward left them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meal_cache.distill import DistillConfig, ViewFeed, method_class
from meal_cache.nets.models import create_model
from meal_cache.store import open_store
from meal_cache.store.keys import feature_key, logits_key
from meal_cache.views import augment

TEACHERS = ("resnet8_w4", "densenet_k12")
# What each test runs: (--teacher-selection, the teachers a step hands the method). `random` is run with each
# teacher drawn, so a method reading another teacher's targets than the drawn one's is seen for either.
SELECTIONS = [("random", [TEACHERS[0]]), ("random", [TEACHERS[1]]), ("all", list(TEACHERS)), ("mean", list(TEACHERS))]
SELECTION_IDS = ["random-resnet", "random-densenet", "all", "mean"]


@dataclass
class Batch:
    """The first 64 rows of a store's view 0, every array of them read once: the normalised images, the two
    teachers' targets with their logits drawn apart, and mixed hard labels."""

    store: str
    images: torch.Tensor
    targets: dict[str, torch.Tensor]
    labels: torch.Tensor

    def method(self, name: str, **overrides):
        """``name`` resolved as distill resolves it and built on a resnet8_w4 student from seed 0 (the same
        student every call): ``(method, config)``."""
        settings = {"store": self.store, "student": "resnet8_w4", "method": name, "device": "cpu", "workers": 0}
        config = DistillConfig(**{**settings, **overrides}).resolved(("blocks", "maps"))
        torch.manual_seed(0)
        student = create_model("resnet8_w4", 10, 16)
        return method_class(name)(student, config, open_store(self.store), 16), config


def first_batch(store_path, digits, rows: int = 64) -> Batch:
    store = open_store(store_path)
    keys = [logits_key(t) for t in store.teacher_names]
    keys += [feature_key(t, kind, b.key) for t in store.teacher_names for b in store.blocks(t)
             for kind in store.layout.features]  # fmt: skip
    index = torch.arange(rows)
    feed = ViewFeed(store, keys, torch.device("cpu"))
    targets = feed.get(0).decoded(index)
    feed.close()
    images = augment.apply(digits.train.images[index], store.view_params(0)[index], digits.mean, digits.std)
    return Batch(str(store_path), images, disagreeing_logits(targets), mixed_labels(digits.train.labels[index]))


def disagreeing_logits(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``targets`` with each teacher's logits drawn apart (the two trained teachers agree on nearly every row,
    which would hide which one a loss read)."""
    generator = torch.Generator().manual_seed(11)
    out = dict(targets)
    for scale, teacher in zip((3.0, 5.0), TEACHERS, strict=True):
        rows, classes = targets[logits_key(teacher)].shape
        out[logits_key(teacher)] = scale * torch.randn(rows, classes, generator=generator)
    return out


def mixed_labels(labels: torch.Tensor, classes: int = 10, share: float = 0.7) -> torch.Tensor:
    """Class probabilities as a Mixup/CutMix view gives them: ``share`` of each row's label, the rest its
    neighbour's."""
    own = torch.zeros(len(labels), classes).scatter_(1, labels[:, None], 1.0)
    other = torch.zeros(len(labels), classes).scatter_(1, labels.roll(1)[:, None], 1.0)
    return share * own + (1.0 - share) * other


def recording_blocks(network: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """Forward hooks that keep the named blocks' outputs of the network's forward passes (graph kept)."""
    seen: dict[str, torch.Tensor] = {}
    for name in names:
        network.get_submodule(name).register_forward_hook(
            lambda _m, _i, output, name=name: seen.__setitem__(name, output))  # fmt: skip
    return seen


# --------------------------------------------------------------------------------------------- formulas


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    z = z - z.max(1, keepdim=True).values
    return z - torch.log(torch.exp(z).sum(1, keepdim=True))


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.exp(log_softmax(logits, temperature))


def hinton_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> float:
    """T^2 KL(teacher || student), both softened at T, averaged over rows."""
    p = teacher_probs.double()
    log_p = torch.log(p.clamp_min(1e-300))
    return float(temperature**2 * (p * (log_p - log_softmax(student_logits, temperature))).sum(1).mean())


def cross_entropy(logits: torch.Tensor, label_probs: torch.Tensor) -> float:
    """-sum_c y_c log softmax(z)_c, averaged over rows: the hard-label loss of probability labels."""
    return float(-(label_probs.double() * log_softmax(logits)).sum(1).mean())


def soft_sets(teacher_logits: dict[str, torch.Tensor], selected: list[str], selection: str, temperature: float):
    """The targets a step learns from: the mean of the selected teachers' softened probabilities (mean), or each
    one's own."""
    probs = [softmax(teacher_logits[t], temperature) for t in selected]
    return [sum(probs) / len(probs)] if selection == "mean" else probs


def teacher_share(selection: str, selected: list[str]) -> float:
    """The weight of one teacher's term: 1/T under mean, 1 under all (sums) and random (one teacher)."""
    return 1.0 / len(selected) if selection == "mean" else 1.0


def pooled(block: torch.Tensor, grid: int) -> torch.Tensor:
    """Average pooling of ``(B, C, H, W)`` to ``grid`` x ``grid`` where the grid divides the map."""
    b, c, h, w = block.shape
    return block.double().reshape(b, c, grid, h // grid, grid, w // grid).mean((3, 5))


def conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution written as its sum over input channels."""
    weight, bias = conv.weight.detach().double()[:, :, 0, 0], conv.bias.detach().double()
    return torch.einsum("oc,bchw->bohw", weight, x.double()) + bias[None, :, None, None]


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """-sum softmax(teacher) log softmax(student) over each row's flattened vector, averaged over rows."""
    s, t = student.double().flatten(1), teacher.double().flatten(1)
    return float(-(softmax(t) * log_softmax(s)).sum(1).mean())


def fooling_bce(scores: torch.Tensor) -> float:
    """The generator's BCE for being called real: mean log(1 + exp(-score))."""
    return float(torch.log1p(torch.exp(-scores.double())).mean())


def fooling_least_squares(scores: torch.Tensor) -> float:
    return float(((scores.double() - 1.0) ** 2).mean())


def student_grad_norm(loss: torch.Tensor, network: torch.nn.Module) -> float:
    """The norm of the gradient ``loss`` sends into ``network``'s own parameters (0 where it sends none)."""
    grads = torch.autograd.grad(loss, list(network.parameters()), retain_graph=True, allow_unused=True)
    return float(sum((g.double() ** 2).sum() for g in grads if g is not None) ** 0.5)
