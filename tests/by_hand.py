"""Helpers several test modules share: a built method on the first rows of a store's view, and the top-k rule of
docs/design.md written out independently of the store's own decoder."""

from __future__ import annotations

import numpy as np
import torch

from meal_cache.distill import DistillConfig, ViewFeed, method_class
from meal_cache.nets.models import create_model
from meal_cache.store import open_store
from meal_cache.views import augment


def first_rows(config: DistillConfig, digits, rows: int = 64):
    """``config``'s method built on a resnet8_w4 student (seed 0) and the inputs of its forward pass on the first
    ``rows`` rows of view 0: ``(method, images, targets, labels)``."""
    store = open_store(config.store)
    torch.manual_seed(0)
    method = method_class(config.method)(create_model("resnet8_w4", 10, 16), config, store, 16)
    index = torch.arange(rows)
    feed = ViewFeed(store, method.needed_keys(), torch.device("cpu"))
    targets = feed.get(0).decoded(index)
    feed.close()
    images = augment.apply(digits.train.images[index], store.view_params(0)[index], digits.mean, digits.std)
    return method, images, targets, digits.train.labels[index]


def topk_rebuilt(index: np.ndarray, value: np.ndarray, lse: np.ndarray, classes: int,
                 temperature: float = 1.0) -> np.ndarray:  # fmt: skip
    """docs/design.md's top-k rule, written out: a stored class keeps its logit (so its probability at the store's
    temperature T is exp(value / T - lse)), every other class gets T * (log((1 - stored mass) / (classes - k)) +
    lse) (the rest spread evenly, at least a millionth of the mass each); read back in the store's dtype, as every
    reader of a store gets it."""
    k = index.shape[-1]
    kept = np.exp(value.astype(np.float64) / temperature - lse[..., None].astype(np.float64)).sum(-1)
    rest = np.maximum(1.0 - kept, 1e-6 * (classes - k)) / (classes - k)
    dense = np.repeat((temperature * (lse.astype(np.float64) + np.log(rest)))[..., None], classes, axis=-1)
    for j in range(k):
        np.put_along_axis(dense, index[..., j : j + 1].astype(np.int64), value[..., j : j + 1].astype(np.float64), -1)
    return dense.astype(value.dtype)


def record_teacher_pixels(monkeypatch, key: str) -> list[torch.Tensor]:
    """The pixels extract feeds teacher ``key``, batch by batch, appended to the returned list as extract runs
    (its ``teacher_outputs`` wrapped for the test)."""
    from meal_cache.extract import run as extract_module

    seen: list[torch.Tensor] = []
    real = extract_module.teacher_outputs

    def recording(teacher, pixels, *args):
        if teacher.spec.key == key:
            seen.append(pixels.clone())
        return real(teacher, pixels, *args)

    monkeypatch.setattr(extract_module, "teacher_outputs", recording)
    return seen


def record_distill_steps(monkeypatch, key: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(rows, the targets' array key, pixels)`` of every distillation step, appended to the returned list as
    distill runs (its ``DistillEpochs.step`` wrapped for the test)."""
    from meal_cache import distill as distill_module

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real_step = distill_module.DistillEpochs.step

    def record(self, batch):
        (rows, targets, _), pixels = batch
        seen.append((rows.clone(), targets[key].clone(), pixels.clone()))
        return real_step(self, batch)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    return seen


def store_arrays(group, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a Zarr group and its subgroups, read whole, by its path below ``group``."""
    import zarr

    out = {}
    for key, member in group.members():
        if isinstance(member, zarr.Array):
            out[prefix + key] = member[:]
        else:
            out.update(store_arrays(member, f"{prefix}{key}/"))
    return out
