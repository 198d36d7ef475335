"""Evaluation: logits of un-augmented images, classification metrics, and a checkpoint evaluated end to end.

The teachers' ensemble a student is compared with (fidelity, KL) is the mean of the teachers' softmax
probabilities on the un-augmented images of the evaluated split. It comes either from the teachers' checkpoints,
run here, or from a store of that split extracted with ``--identity-view`` (the teachers' cached logits on the
un-augmented images, float16, so the metrics agree with the checkpoints' to about 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meal_cache.data.datasets import AnySplit, ImageDataset, load_dataset
from meal_cache.engine.progress import progress_bar
from meal_cache.errors import UserError
from meal_cache.losses import soft_targets
from meal_cache.nets.checkpoint import load_checkpoint, model_from_checkpoint
from meal_cache.runtime import Precision, resolve_device
from meal_cache.views import augment

ECE_BINS = 15


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    part: AnySplit,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int = 512,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "evaluate",
    decode: str = "auto",
) -> torch.Tensor:
    """Logits (float32, on the CPU) of the evaluation view of every row of ``part``: the whole image in memory,
    the central 224/256 of a file's shorter side resized to the output size (torchvision's resize / centre crop).
    With ``progress``, a bar counts the images."""
    precision = Precision(device)
    was_training = model.training
    model.eval()
    outputs = []
    params = part.eval_view(workers)
    source = part.open(device, workers, decode=decode)
    requests = ((rows, params[rows], None) for rows in torch.arange(len(part)).split(batch_size))
    bar = progress_bar(total=len(part), desc=desc, unit="img", leave=False, disable=not progress)
    try:
        for _, pixels in source.pixels(requests):
            batch = augment.normalise(pixels, mean, std, precision.channels_last)
            with precision.autocast():
                outputs.append(model(batch).float().cpu())
            bar.update(len(batch))
    finally:
        bar.close()
        source.close()
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1 and top-5 accuracy (percent) and negative log-likelihood (nats per image)."""
    labels = labels.to(logits.device)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits.any(1).float().mean().item(),
        "nll": F.cross_entropy(logits.float(), labels).item(),
        "n": int(labels.shape[0]),
    }


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (percent): |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    probs = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.float().mean().item() * abs(
                correct[inside].mean().item() - confidence[inside].mean().item()
            )
    return 100.0 * total


def fidelity(logits: torch.Tensor, ensemble_probs: torch.Tensor) -> float:
    """Top-1 agreement (percent) with the teacher ensemble."""
    return 100.0 * (logits.argmax(1) == ensemble_probs.argmax(1)).float().mean().item()


def ensemble_probabilities(teacher_logits: list[torch.Tensor]) -> torch.Tensor:
    """The teachers' ensemble: the mean of their softmax probabilities (not the softmax of their mean logits)."""
    # The soft labels distillation trains on, at temperature 1: one definition of the ensemble for both.
    return soft_targets(teacher_logits, 1.0)


def kl_to_ensemble(logits: torch.Tensor, ensemble_probs: torch.Tensor) -> float:
    """Mean KL(ensemble || student) in nats per image: how far the student's distribution is from the teachers'."""
    log_student = torch.log_softmax(logits.float(), dim=1)
    return torch.nn.functional.kl_div(log_student, ensemble_probs.float(), reduction="batchmean").item()


def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    split: str = "test",
    device: torch.device | None = None,
    batch_size: int = 512,
    workers: int | None = None,
    progress: bool = False,
    decode: str = "auto",
) -> dict[str, float]:
    """Metrics of ``model`` on a split of ``dataset``, seen without augmentation (a bar with ``progress``;
    ``decode`` as ``--decode`` says, see source.decode_device)."""
    device = device or next(model.parameters()).device
    part = dataset.split(split)
    logits = predict_logits(model, part, dataset.mean, dataset.std, device, batch_size, workers, progress,
                            f"evaluate on {split}", decode)  # fmt: skip
    return classification_metrics(logits, part.labels)


@dataclass
class CheckpointResult:
    """A checkpoint's network, its logits on the evaluated split and their metrics."""

    model: nn.Module
    logits: torch.Tensor
    metrics: dict[str, float]


def evaluate_payload(
    payload: dict,
    part: AnySplit,
    device: torch.device,
    ensemble: torch.Tensor | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> CheckpointResult:
    """The network a checkpoint records, on the un-augmented images of ``part``: top-1, top-5, NLL and ECE, and
    given the teachers' ensemble probabilities on the same images, the fidelity to it and the KL from it. The one
    way from a checkpoint to its metrics, for ``meal-cache evaluate`` and the pipeline's report alike."""
    model = model_from_checkpoint(payload, device)
    logits = predict_logits(model, part, tuple(payload["input"]["mean"]), tuple(payload["input"]["std"]), device,
                            workers=workers, progress=progress, desc=f"evaluate {payload['arch']}")  # fmt: skip
    metrics = classification_metrics(logits, part.labels)
    metrics["ece"] = expected_calibration_error(logits, part.labels)
    if ensemble is not None:
        metrics["fidelity"] = fidelity(logits, ensemble)
        metrics["kl_to_ensemble"] = kl_to_ensemble(logits, ensemble)
    return CheckpointResult(model, logits, metrics)


def _teacher_logits_from_checkpoints(
    teachers: list[str],
    dataset: ImageDataset,
    part: AnySplit,
    target: torch.device,
    num_classes: int,
    checkpoint: str,
    workers: int | None = None,
    progress: bool = False,
    teacher_dir: str | Path = "teachers",
) -> list[torch.Tensor]:
    """Each teacher's logits on ``part``: a checkpoint file as it is, any other name resolved as extract resolves
    it (``teacher_dir``/NAME.pt, ``ARCH:WEIGHTS``), with that teacher's own normalisation."""
    outputs = []
    for teacher in teachers:
        if Path(teacher).is_file():
            teacher_payload = load_checkpoint(teacher)
            if teacher_payload["num_classes"] != num_classes:
                raise UserError(f"teacher '{teacher}' predicts {teacher_payload['num_classes']} classes, "
                                f"'{checkpoint}' {num_classes}")  # fmt: skip
            model = model_from_checkpoint(teacher_payload, target)
            mean, std = tuple(teacher_payload["input"]["mean"]), tuple(teacher_payload["input"]["std"])
        else:
            # Imported here: the teachers' module loads the pretrained families, which train and report never need.
            from meal_cache.nets.teachers import resolve_teacher

            resolved = resolve_teacher(teacher, teacher_dir, dataset)
            model, mean, std = resolved.model.to(target), resolved.mean, resolved.std
        outputs.append(predict_logits(model, part, mean, std, target, workers=workers, progress=progress,
                                      desc=f"teacher {teacher}"))  # fmt: skip
    return outputs


def _teacher_logits_from_store(path: str, dataset: ImageDataset, split: str) -> tuple[list[torch.Tensor], list[str]]:
    """Every teacher's stored logits on the identity view of ``split``, after checking the store holds exactly
    those rows: the same split, fingerprint, classes and image size, complete, with an identity view."""
    # Imported here: zarr adds a quarter of a second to every import of this module (train, report) otherwise.
    from meal_cache.store.teacher_store import open_store

    store = open_store(path)
    store.check_matches(dataset.describe(), split)
    view = store.identity_view
    if store.dense:  # its logits are of the whole image at the dense size, not the evaluation view
        raise UserError(
            f"store '{path}' is a dense store (maps of whole images for deriving crops), not the evaluation view; "
            f"extract a store of it with --split {split} --views 0 --identity-view"
        )
    if view is None:
        raise UserError(
            f"store '{path}' has no identity view (un-augmented images); extract it with --identity-view "
            f"(e.g. --split {split} --views 0 --identity-view)"
        )
    names = store.teacher_names
    return [torch.from_numpy(store.logits(name, view).astype("float32")) for name in names], names


def evaluate_checkpoint(
    checkpoint: str,
    data: str | None = None,
    data_root: str = "data",
    download: bool = False,
    image_size: int | None = None,
    split: str = "test",
    device: str = "auto",
    teachers: list[str] | None = None,
    store: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    teacher_dir: str | Path = "teachers",
) -> dict:
    """Evaluate a checkpoint on ``data`` (default: the dataset it was trained on, as it recorded it): top-1,
    top-5, NLL and ECE, and with ``teachers`` (named as extract names them: a checkpoint path, NAME for
    ``teacher_dir``/NAME.pt, or ``ARCH:WEIGHTS``) or a store of the same split with an identity view (``store``)
    the fidelity to the teachers' ensemble and the KL from it."""
    if teachers and store:
        raise UserError("--teachers and --store both give the teachers' ensemble; pass only one of them")
    target = resolve_device(device)
    payload = load_checkpoint(checkpoint)
    recorded = payload["data"]
    if data is None:
        data = recorded["spec"]
        data_root = recorded["options"].get("root", data_root) if data_root == "data" else data_root
        image_size = image_size or recorded["options"].get("image_size")
    dataset = load_dataset(data, data_root, download, image_size or payload["input"]["image_size"])
    if dataset.num_classes != payload["num_classes"]:
        raise UserError(f"'{checkpoint}' predicts {payload['num_classes']} classes; {data} has {dataset.num_classes}")
    if dataset.image_size != payload["input"]["image_size"]:
        raise UserError(
            f"'{checkpoint}' takes {payload['input']['image_size']} px images; {data} gives "
            f"{dataset.image_size} px (set --image-size)"
        )
    part = dataset.split(split)
    # Before the model runs: a store that does not fit the data is refused without spending the time.
    teacher_names = [str(t) for t in teachers or []]
    teacher_logits = None
    if store:
        teacher_logits, teacher_names = _teacher_logits_from_store(store, dataset, split)
    if teachers:
        teacher_logits = _teacher_logits_from_checkpoints(teachers, dataset, part, target, payload["num_classes"],
                                                          checkpoint, workers, progress, teacher_dir)  # fmt: skip
    ensemble = ensemble_probabilities(teacher_logits) if teacher_logits is not None else None
    metrics = evaluate_payload(payload, part, target, ensemble, workers, progress).metrics
    same_data = dataset.fingerprint(split) == recorded["fingerprint"].get(split)
    return {
        "checkpoint": str(checkpoint),
        "arch": payload["arch"],
        "data": data,
        "split": split,
        "fingerprint": dataset.fingerprint(split),
        "same_data_as_training": same_data,
        "teachers": teacher_names,
        "store": str(store) if store else None,
        "metrics": metrics,
    }
