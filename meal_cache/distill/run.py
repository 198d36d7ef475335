"""A distillation run: open the store and its dataset, build the method, its optimisers and the feed, train
with the shared loop (:func:`meal_cache.engine.loop.fit`), and write ``config.json``, ``metrics.jsonl``, ``last.pt`` and
the students. The teachers' checkpoints are never opened, except by the ``--online`` reference."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from meal_cache.data.datasets import ImageDataset, load_recorded
from meal_cache.data.source import replay_decode
from meal_cache.dense import DenseTargets
from meal_cache.distill.built_run import DistillRun, ReplayedViews, config_json
from meal_cache.distill.config import DistillConfig
from meal_cache.distill.feed import (
    OnlineTeachers,
    divergent_batches,
    make_batch_source,
    online_teacher_keys,
)
from meal_cache.distill.methods.adversarial import AdversarialMethod
from meal_cache.distill.methods.peers import peer_architectures
from meal_cache.distill.registry import method_class
from meal_cache.distill.step import DistillEpochs
from meal_cache.engine.distributed import World, init_world
from meal_cache.engine.evaluate import evaluate
from meal_cache.engine.loop import TENSORBOARD_DIR, Optimisation, Schedule, Stage, fit, make_optimizer, resume_state
from meal_cache.errors import UserError
from meal_cache.nets.models import create_model
from meal_cache.runtime import Precision, seed_everything
from meal_cache.store.growth import as_recorded
from meal_cache.store.teacher_store import TeacherStore, open_store
from meal_cache.store.verify import verify_store


def load_store_dataset(config: DistillConfig, store: TeacherStore) -> ImageDataset:
    """The dataset the store records (or ``config.data``), refused unless it matches the store."""
    recorded = store.dataset
    dataset = load_recorded(recorded, config.data, config.data_root, config.download)
    store.check_matches(dataset.describe(), recorded["split"])
    return dataset


def stored_features(path: str) -> tuple[str, ...] | None:
    """The feature kinds the store at ``path`` holds, or None where there is no readable store (distill then
    reports that with its own message)."""
    try:
        return open_store(path).layout.features
    except (UserError, OSError, KeyError, ValueError):
        return None


def distill(
    config: DistillConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dataset: ImageDataset | None = None,
    tensorboard: bool = False,
) -> dict:
    """Train a student from a store; writes ``config.json``, ``metrics.jsonl``, ``last.pt`` and ``student.pt``
    (and with ``tensorboard`` the records as TensorBoard scalars in ``tensorboard/``, not a setting of the run)
    under ``out`` and returns the final summary (test metrics, history).

    Under ``torchrun`` each rank takes its share of every batch (the global batch is ``batch_size``, so the
    schedule is the one a single process runs); the student is wrapped in DistributedDataParallel, the
    discriminators' and adapters' gradients are averaged over ranks, and rank 0 alone writes files."""
    config = config.resolved(stored_features(config.store))
    world, device = init_world(config.device)
    progress = progress and world.is_main
    if config.batch_size % world.size:
        raise UserError(f"--batch-size {config.batch_size} must be a multiple of the {world.size} ranks")
    out = Path(out)
    occupied = f"'{out}' is not empty; pass --resume to continue it or --overwrite to replace it"
    state = resume_state(out, out / "last.pt", config_json(config), resume, overwrite,
                         out.exists() and any(out.iterdir()), occupied)  # fmt: skip
    world.barrier()  # every rank has looked at ``out`` before rank 0 writes into it
    # A run resumed on a store that has grown since (more teachers or views) reads it as it was.
    run = build_run(config, world, device, dataset, progress, None if state is None else state.get("store_settings"))
    start_epoch, history = run.restore(state)
    if world.is_main:
        run.start_output(out, fresh=state is None)
    epochs = DistillEpochs(run)
    stage = Stage(model=run.distiller.student, train_mode=run.distiller.train, step=epochs.step,
                  batches=epochs.batches, save=lambda epoch, history, _test: run.save_state(out, epoch, history),
                  record_fields=epochs.record_fields, desc=config.method)  # fmt: skip
    try:
        history, test = fit(stage, run.optimisation, run.schedule, run.dataset, device, config.seed, start_epoch,
                            history, world, out / "metrics.jsonl", progress, config.workers, config.decode,
                            tensorboard=out / TENSORBOARD_DIR if tensorboard else None,
                            eval_every=config.eval_every)  # fmt: skip
    finally:
        run.source.close()
        run.images.close()
        if run.divergent is not None:
            run.divergent.close()
    if test is None:  # resumed a run that had already finished
        test = evaluate(run.distiller.student, run.dataset, "test", device, workers=config.workers,
                        decode=config.decode)  # fmt: skip
    world.check_identical(run.distiller, "the student, adapters and discriminators")
    summary = {"test": test, "history": history}
    if world.is_main:
        run.save_student(out / "student.pt", history, test)
        if method_class(config.method).trains_peers:
            summary["peers"] = save_peers(run, out, history)
    return summary


def build_run(
    config: DistillConfig,
    world: World,
    device: torch.device,
    dataset: ImageDataset | None,
    progress: bool,
    store_settings: dict | None = None,
) -> DistillRun:
    """Open the store, load (or check) its dataset, and build the distiller, its optimisers and the batch source.
    The student and the discriminators are initialised from ``config.seed``. ``store_settings``: the store's
    settings a resumed run started on, where it has grown since (its first teachers and views are then read)."""
    store = as_recorded(open_store(config.store), store_settings)
    if config.online:  # by name, before the dataset is loaded and any teacher is
        online_teacher_keys(config, store)
    if dataset is None:
        dataset = load_store_dataset(config, store)
    else:
        store.check_matches(dataset.describe(), store.dataset["split"])
    check_logits_temperature(config, store)
    check_sampled_logits(config, store)
    precision = Precision(device)
    seed_everything(config.seed)
    student = create_model(config.student, dataset.num_classes, dataset.image_size)
    method = method_class(config.method)
    if method.trains_peers and world.enabled:
        raise UserError(f"--method {config.method} trains its peers in one process; run it without torchrun")
    distiller = method(student, config, store, dataset.image_size)
    refuse_damaged(store, config.store, distiller.needed_keys())
    distiller = distiller.to(device)
    if precision.channels_last:
        for network in distiller.trained_networks():
            network.to(memory_format=torch.channels_last)
    run_student = None
    if world.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run_student = DistributedDataParallel(distiller.student, device_ids=[device] if device.type == "cuda" else None)
    s_opt = make_optimizer(distiller.student_parameters(), config.lr, config.momentum, config.weight_decay,
                           config.nesterov)  # fmt: skip
    d_params = list(distiller.discriminators.parameters()) if isinstance(distiller, AdversarialMethod) else []
    d_opt = None
    game = distiller.options  # a player's options hold the game's (GameOptions)
    if d_params and game.adv_game == "joint":  # the reference's one optimiser, at disc_lr / lr of its rate
        s_opt.add_param_group({"params": d_params, "lr": game.disc_lr, "lr_scale": game.disc_lr / config.lr})
    elif d_params:
        d_opt = torch.optim.Adam(d_params, lr=game.disc_lr, betas=(0.5, 0.999))
    # Parameters DistributedDataParallel does not own: the adapters, and jointly trained discriminators.
    shared = list(distiller.adapters.parameters()) + (d_params if d_opt is None else [])
    optimisation = Optimisation(s_opt, precision.grad_scaler(), lambda: world.average_gradients(shared))
    split = dataset.split(store.dataset["split"])
    images = split.open(device, config.workers, decode=replay_decode(config.decode, store.dataset.get("decode")))
    labels = split.labels.to(device, non_blocking=True)
    if config.refine_labels:
        labels = _refined_labels(config, labels, device, progress)
    views = replayed_views(store, config.crops_per_image, config.store)
    dense = DenseTargets(store, distiller.needed_keys()) if store.dense else None
    if progress and not config.online and dense is None:
        _note_replays(config, len(views))
    schedule = Schedule.of(config, len(labels) * config.crops_per_image)
    divergent = divergent_batches(config, store, distiller.needed_keys(), device, schedule.steps)
    if divergent is not None:
        schedule = dataclasses.replace(schedule, steps=schedule.steps + divergent.per_epoch)
    return DistillRun(
        config=config, world=world, device=device, precision=precision, store=store, dataset=dataset,
        distiller=distiller, run_student=run_student, optimisation=optimisation, disc_optimizer=d_opt,
        schedule=schedule, images=images, labels=labels, views=views, divergent=divergent, dense=dense,
        view_params=ReplayedViews(store, keep=2 * config.crops_per_image),
        recipe=store.view_recipe,  # fresh views are drawn as the store's were (its --scale, --hflip, ...)
        sizes=source_sizes(store, split, config.workers),
        online=OnlineTeachers(config, store, dataset, precision) if config.online else None,
        source=make_batch_source(config, store, distiller.needed_keys(), device),
        own_optimizers=distiller.own_optimizers(),
    )  # fmt: skip


def replayed_views(store: TeacherStore, crops: int, path: str, option: str = "--crops-per-image") -> list[int]:
    """The views a run cycles through: the augmented ones (or the identity view alone), a dense store's one view
    of whole images; refused where ``crops`` per image (the setting ``option``) need more views than a store of
    views has."""
    if store.dense:  # any number of crops are drawn from its one view
        return [0]
    views = store.augmented_views or [store.identity_view]
    if crops > len(views):
        raise UserError(f"{option} {crops} needs as many cached views; '{path}' has {len(views)} (extract "
                        f"with --views {crops} or more)")  # fmt: skip
    return views


def source_sizes(store: TeacherStore, split, workers: int | None) -> torch.Tensor:
    """Each row's source (H, W), for drawing fresh crops: as the store recorded them for image files, so no
    header is read again, else the split's."""
    recorded = store.source_sizes()
    return recorded if recorded is not None else split.source_sizes(workers)


# Replays of one cached view beyond which students overfit it (pipelines/digits-views-long.toml: 60 replays of
# 4 views cost NLL against fresh views, 15 of 16 did not; docs/results.md, "Few views on a long schedule").
MAX_REPLAYS = 15


def _note_replays(config: DistillConfig, views: int) -> None:
    """Say so when the run replays each cached view more than MAX_REPLAYS times: a note, since on short data or
    with strong regularisation it may be what the user wants."""
    replays = config.epochs * config.crops_per_image / views
    if replays > MAX_REPLAYS:
        wanted = math.ceil(config.epochs * config.crops_per_image / MAX_REPLAYS)
        tqdm.write(f"note: {config.epochs} epochs replay each of the store's {views} views {replays:.0f} times; "
                   f"students overfit views replayed more than about {MAX_REPLAYS} times (docs/results.md, \"Few "
                   f"views on a long schedule\"): extract with --views {wanted} or more")  # fmt: skip


def _refined_labels(config: DistillConfig, labels: torch.Tensor, device: torch.device, progress: bool) -> torch.Tensor:
    """``--refine-labels``: the hard labels of the rows `meal-cache inspect` finds suspect become the ensemble's."""
    from meal_cache.analysis import suspect_rows

    refined = suspect_rows(config.store, config.refine_confidence)
    if refined:
        rows = torch.tensor(sorted(refined), device=device)
        labels = labels.clone()
        labels[rows] = torch.tensor([refined[r] for r in sorted(refined)], device=device)
    if progress:
        tqdm.write(f"--refine-labels: {len(refined)} suspect label(s) replaced by the teachers' ensemble")
    return labels


def check_logits_temperature(config: DistillConfig, store: TeacherStore) -> None:
    """Refuse soft labels at another temperature than a sampled store's draws: counts drawn at T estimate the
    teacher's softmax at T only (top-k logits, exact at their temperature, stay close at others)."""
    layout = store.layout
    if not layout.logits_estimated or not config.soft_weight or config.temperature == layout.temperature:
        return
    raise UserError(f"'{config.store}' holds classes drawn at temperature {layout.temperature:g}, an estimate of the "
                    f"soft labels at that temperature only; distill with --temperature {layout.temperature:g}, or "
                    f"extract again with --logits-temperature {config.temperature:g}")  # fmt: skip


def check_sampled_logits(config: DistillConfig, store: TeacherStore) -> None:
    """Refuse a sampled store where the method's config reads the soft labels otherwise than linearly (the
    method says why: :meth:`Method.sampled_logits_refusal`): count / K estimates only such losses without bias."""
    if not store.layout.logits_estimated:
        return
    k = store.layout.logits_k
    reason = method_class(config.method).sampled_logits_refusal(config)
    if reason is not None:
        raise UserError(f"'{config.store}' holds {k} classes drawn a row, read back as count / {k}: unbiased only for "
                        f"a loss linear in the soft labels, and {reason}; extract with --logits topk:K (or all) for "
                        "it")  # fmt: skip


def refuse_damaged(store: TeacherStore, path: str, keys: list[str]) -> None:
    """Refuse a store whose needed chunks are missing or fail their checksums, before any training."""
    report = verify_store(store, keys=["labels", *store.view_keys, *store.with_companions(keys)])
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise UserError(f"store '{path}' is damaged: {report.problems[0]}{more}; `meal-cache verify --repair "
                        f"{path}` marks those chunks, then the same extract command re-extracts them")  # fmt: skip


def save_peers(run: DistillRun, out: Path, history: list[dict]) -> list[dict]:
    """``peerI.pt`` for every network a method trains as a student (``student.pt`` is peer 0's), each evaluated on
    the test split; returns their test metrics in order."""
    results = []
    networks = run.distiller.trained_networks()
    for index, (peer, arch) in enumerate(zip(networks, peer_architectures(run.config), strict=True)):
        test = evaluate(peer, run.dataset, "test", run.device, workers=run.config.workers, decode=run.config.decode)
        run.save_student(Path(out) / f"peer{index}.pt", history, test, model=peer, arch=arch)
        results.append(test)
    return results
