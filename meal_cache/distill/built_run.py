"""A distillation run as :func:`~meal_cache.distill.run.build_run` builds it: :class:`DistillRun` (the store,
the distiller and its optimisers, the images, labels and views to replay), its state saved and restored, and
``config.json``. The epoch plan (:mod:`.step`) and the run (:mod:`.run`) both read it; it imports neither."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meal_cache.data.datasets import ImageDataset
from meal_cache.data.source import ImageSource
from meal_cache.dense import DenseTargets
from meal_cache.distill.config import DistillConfig, drop_unset
from meal_cache.distill.feed import DivergentBatches, OnlineTeachers
from meal_cache.distill.methods.base import Method
from meal_cache.distill.registry import method_class
from meal_cache.engine.distributed import World
from meal_cache.engine.loop import Optimisation, Schedule
from meal_cache.errors import SettingsMismatch, settings_difference
from meal_cache.nets.checkpoint import model_payload, save_checkpoint, state_dict_cpu
from meal_cache.runtime import Precision
from meal_cache.store.teacher_store import TeacherStore
from meal_cache.views import augment


class ReplayedViews:
    """The cached views' parameters (crops, flips, ops, mixing), read from the store when an epoch first replays
    a view and only the last ``keep`` of them held, so memory stays flat however many views the store has."""

    def __init__(self, store: TeacherStore, keep: int) -> None:
        self.store, self.keep = store, max(1, keep)
        self.held: OrderedDict[int, augment.ViewParams] = OrderedDict()

    def __call__(self, view: int) -> augment.ViewParams:
        if view not in self.held:
            self.held[view] = self.store.view_params(view)
            while len(self.held) > self.keep:
                self.held.popitem(last=False)
        self.held.move_to_end(view)
        return self.held[view]


@dataclass
class DistillRun:
    """Everything a distillation run trains with, built once: the store and its dataset, the distiller and its
    optimisers, the image source and the labels, the views to replay and the batch source of the targets."""

    config: DistillConfig
    world: World
    device: torch.device
    precision: Precision
    store: TeacherStore
    dataset: ImageDataset
    distiller: Method
    run_student: nn.Module | None
    optimisation: Optimisation
    disc_optimizer: torch.optim.Optimizer | None
    schedule: Schedule
    images: ImageSource
    labels: torch.Tensor
    views: list[int]
    view_params: ReplayedViews
    recipe: augment.Recipe
    online: OnlineTeachers | None
    source: object
    sizes: torch.Tensor  # each row's source (H, W), for fresh views
    divergent: DivergentBatches | None = None
    dense: DenseTargets | None = None  # a dense store's maps, turned into each batch's crops' targets
    own_optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)

    def restore(self, state: dict | None) -> tuple[int, list[dict]]:
        """Load a saved state (see :meth:`save_state`); the epoch to start from and the history so far."""
        if state is None:
            return 0, []
        # A run is resumable only on the targets it trained on: a store re-extracted at the same path with other
        # settings or retrained teachers would otherwise finish (or pass as finished) on stale weights.
        settings = self.store.attrs.get("settings")
        if "store_settings" in state and state["store_settings"] != settings:
            difference = settings_difference(state["store_settings"], settings)
            raise SettingsMismatch(f"the run in progress was distilled from '{self.config.store}' as it was extracted "
                                   f"with other settings or teachers ({difference}); --resume needs the same store "
                                   "(or pass --overwrite to start again)")  # fmt: skip
        self.distiller.load_state_dict(state["distiller"])
        self.optimisation.load_state_dict({"optimizer": state["student_optimizer"], "scaler": state.get("scaler")})
        if self.disc_optimizer is not None:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        for name, optimizer in self.own_optimizers.items():
            optimizer.load_state_dict(state["own_optimizers"][name])
        return int(state["epoch"]), list(state["history"])

    def start_output(self, out: Path, fresh: bool) -> None:
        """``config.json`` always; a fresh run also empties ``metrics.jsonl`` and removes stale checkpoints."""
        if fresh:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("")
            for stale in ("last.pt", "student.pt", *(p.name for p in out.glob("peer*.pt"))):
                (out / stale).unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(config_json(self.config), indent=2) + "\n")

    def save_state(self, out: Path, epoch: int, history: list[dict]) -> None:
        """``last.pt``: what :meth:`restore` needs to continue after ``epoch``."""
        optimisation = self.optimisation.state_dict()
        save_checkpoint(out / "last.pt", {
            "format": "meal-cache-checkpoint/1",
            "kind": "distill-state",
            "config": config_json(self.config),
            "store_settings": self.store.attrs.get("settings"),
            "epoch": epoch,
            "history": history,
            "distiller": state_dict_cpu(self.distiller),
            "student_optimizer": optimisation["optimizer"],
            "scaler": optimisation["scaler"],
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else {},
            "own_optimizers": {name: optimizer.state_dict() for name, optimizer in self.own_optimizers.items()},
        })  # fmt: skip

    def save_student(self, path: Path, history: list[dict], test: dict, model: nn.Module | None = None,
                     arch: str | None = None) -> None:  # fmt: skip
        """``student.pt``: the trained student (or ``model`` of architecture ``arch``, a peer) as ``train`` writes
        networks, plus where it was distilled from."""
        config = self.config
        payload = model_payload(model or self.distiller.student, arch or config.student, self.dataset,
                                config_json(config), config.epochs, history, test)  # fmt: skip
        payload["distillation"] = {"store": str(config.store), "teachers": self.distiller.teachers,
                                   "method": config.method}  # fmt: skip
        save_checkpoint(path, payload)


def config_json(config: DistillConfig) -> dict:
    """The recorded config of a resolved ``config``: everything but how many processes decode, which changes no
    result; the method's options are those it records (:meth:`Method.recorded_options`: the ones given, and the
    MEAL family's knobs it reads, resolved)."""
    recorded = drop_unset(dataclasses.asdict(config))
    recorded.pop("workers")
    recorded.pop("decode")
    recorded.pop("grad_norm_every")  # diagnostics only: the weights are the same with or without them
    recorded.pop("given", None)
    recorded.pop("options", None)
    recorded["method_options"] = method_class(config.method).recorded_options(config)
    # Runs of methods without options record what they recorded before options existed.
    if not recorded["method_options"]:
        recorded.pop("method_options")
    return json.loads(json.dumps(recorded))
