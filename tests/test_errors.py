"""Every bad input of docs/errors.md: one `Error:` line naming the problem, exit status 2, no traceback, and no
existing file changed; in click's test runner for the table's rows, and as a real process (the installed
`meal-cache` console script) for the rows whose failure comes from deep inside a run: a damaged store, a failed
write, a store URL fsspec cannot open (torchrun's row is in tests/test_distributed.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from console import ROOT
from imagefolder import make_image_folder, write_image
from PIL import Image

from meal_cache.cli import main


class Pickled:
    """A class a checkpoint must never be allowed to instantiate."""


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dir, small_store):
    """Files for every case, made once: teachers, stores (whole, edited copies), npz and image folders."""
    root = tmp_path_factory.mktemp("errors")
    teachers = root / "teachers"
    shutil.copytree(teacher_dir, teachers)
    (teachers / "truncated.pt").write_bytes((teachers / "resnet8_w4.pt").read_bytes()[:5000])
    torch.save({"format": "meal-cache-checkpoint/1", "payload": Pickled()}, teachers / "pickled.pt")
    store, _ = small_store
    for name, attrs in {"newer.zarr": {"format": "meal-cache/99"}, "incomplete.zarr": {"complete": False}}.items():
        shutil.copytree(store, root / name)
        zarr.open_group(str(root / name), mode="r+").attrs.update(attrs)
    shutil.copytree(store, root / "resized.zarr")
    group = zarr.open_group(str(root / "resized.zarr"), mode="r+")
    dataset = dict(group.attrs["dataset"])
    dataset["options"] = {**dataset["options"], "image_size": 12}
    group.attrs["dataset"] = dataset
    rng = np.random.default_rng(0)
    np.savez(root / "keys.npz", pixels=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, int))
    np.savez(root / "dtype.npz", images=np.zeros((4, 8, 8), np.float32), labels=np.zeros(4, int))
    np.savez(root / "shape.npz", images=np.zeros((4, 8, 8, 5), np.uint8), labels=np.zeros(4, int))
    np.savez(root / "empty.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, int))
    np.savez(root / "three.npz", images=rng.integers(0, 255, (30, 16, 16), np.uint8), labels=np.arange(30) % 3)
    for name in ("notimage", "emptyclass"):
        for split in ("train", "val"):
            for cls in ("a", "b"):
                folder = root / name / split / cls
                folder.mkdir(parents=True)
                if not (name == "emptyclass" and cls == "b"):
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(folder / "0.png")
    (root / "notimage" / "train" / "a" / "1.png").write_text("not an image")
    # Streamed JPEG folders of 10 classes, read at 16 px so the digits teachers take them.
    streamed = make_image_folder(root / "jpegs", classes=10, train=2, val=1, sizes=(40, 90))
    shutil.copytree(streamed, root / "truncated")
    victim = root / "truncated" / "train" / "c03" / "1.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 3 // 4])  # the header stays whole
    shutil.copytree(streamed, root / "extra")
    shutil.copytree(streamed / "val" / "c09", root / "extra" / "val" / "c10")
    shutil.copytree(streamed, root / "changed")
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    extract(
        ExtractConfig(
            teachers=["resnet8_w4"],
            data=f"imagefolder:{root / 'changed'}",
            image_size=16,
            views=1,
            teacher_dir=str(teachers),
            device="cpu",
            workers=0,
        ),
        root / "changed.zarr",
        progress=False,
    )
    write_image(root / "changed" / "train" / "c00" / "0.jpg", 77, 66, np.array([9.0, 9.0, 9.0]), rng)
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text("{}\n")
    (root / "bad.toml").write_text('name = "x"\nviewz = 3\n')
    (root / "existing.pt").write_bytes(b"an earlier checkpoint")
    return root, store


def _cases(root: Path, store: Path) -> list[tuple[str, list[str], str]]:
    t = ["--teacher-dir", str(root / "teachers"), "--device", "cpu"]
    d = ["--device", "cpu"]
    out = str(root / "new.pt")
    return [
        ("unknown architecture", ["train", "--arch", "resnet9", "--out", out], "unknown architecture 'resnet9'"),
        ("unknown dataset", ["train", "--arch", "resnet8", "--data", "mnist", "--out", out], "unknown dataset 'mnist'"),
        ("unknown teacher", ["extract", "--teachers", "resnet", "--out", str(root / "s.zarr"), *t],
         "teacher 'resnet' not found"),
        ("missing teacher checkpoint", ["extract", "--teachers", str(root / "none.pt"), "--out",
                                        str(root / "s.zarr"), *t], "not found"),
        ("truncated checkpoint", ["extract", "--teachers", "truncated", "--out", str(root / "s.zarr"), *t],
         "not a readable checkpoint"),
        ("checkpoint with a pickle payload", ["extract", "--teachers", "pickled", "--out", str(root / "s.zarr"), *t],
         "not a readable checkpoint"),
        ("teacher with other classes", ["extract", "--teachers", "resnet8_w4", "--data", f"npz:{root}/three.npz",
                                        "--out", str(root / "s.zarr"), *t], "predicts 10 classes"),
        ("store of another dataset", ["distill", "--store", str(store), "--student", "resnet8", "--data",
                                      "fake:1437", "--out", str(root / "d1"), *d], "fingerprint differs"),
        ("store of another image size", ["distill", "--store", str(root / "resized.zarr"), "--student", "resnet8",
                                         "--out", str(root / "d2"), *d], "16 px, the data's 12"),
        ("incomplete store", ["distill", "--store", str(root / "incomplete.zarr"), "--student", "resnet8",
                              "--out", str(root / "d3"), *d], "store is incomplete"),
        ("store of a newer format", ["info", str(root / "newer.zarr")], "format 'meal-cache/99'"),
        ("missing store", ["inspect", str(root / "none.zarr")], "store not found"),
        ("no views", ["extract", "--teachers", "resnet8_w4", "--views", "0", "--out", str(root / "s.zarr"), *t],
         "--views must be at least 1"),
        ("invalid grid", ["extract", "--teachers", "resnet8_w4", "--grid", "3", "--out", str(root / "s.zarr"), *t],
         "Invalid value for '--grid'"),
        ("unknown block", ["extract", "--teachers", "resnet8_w4", "--blocks", "layer9", "--out",
                           str(root / "s.zarr"), *t], "unknown block(s) layer9"),
        ("zero batch size", ["train", "--arch", "resnet8", "--batch-size", "0", "--out", out],
         "--batch-size must be at least 1"),
        ("zero epochs", ["distill", "--store", str(store), "--student", "resnet8", "--epochs", "0", "--out",
                         str(root / "d4"), *d], "--epochs must be at least 1"),
        ("npz without images", ["train", "--arch", "resnet8", "--data", f"npz:{root}/keys.npz", "--out", out],
         "lacks array(s) images"),
        ("npz of floats", ["train", "--arch", "resnet8", "--data", f"npz:{root}/dtype.npz", "--out", out],
         "images must be uint8"),
        ("npz of 5 channels", ["train", "--arch", "resnet8", "--data", f"npz:{root}/shape.npz", "--out", out],
         "of shape (N,H,W) or (N,H,W,3)"),
        ("empty npz", ["train", "--arch", "resnet8", "--data", f"npz:{root}/empty.npz", "--out", out],
         "holds no images"),
        ("image folder with a non-image", ["train", "--arch", "resnet8", "--data", f"imagefolder:{root}/notimage",
                                           "--out", out], "is not a readable image"),
        ("image folder with an empty class", ["train", "--arch", "resnet8", "--data",
                                              f"imagefolder:{root}/emptyclass", "--out", out],
         "every subfolder of train/ is a class: put images in it or remove it"),
        ("held-out class that train lacks", ["train", "--arch", "resnet8", "--data", f"imagefolder:{root}/extra",
                                             "--out", out], "has class folder(s) c10 that train/ lacks"),
        ("skip_bad neither 0 nor 1", ["train", "--arch", "resnet8", "--data", f"imagefolder:{root}/jpegs?skip_bad=2",
                                      "--out", out], "dataset option skip_bad takes 0 or 1, got 2"),
        ("in_memory on a dataset in memory", ["train", "--arch", "resnet8", "--data", "digits?in_memory=1", "--out",
                                              out], "dataset option in_memory applies to imagefolder only"),
        ("negative top-k", ["extract", "--teachers", "resnet8_w4", "--logits", "topk:-1", "--out",
                            str(root / "k0.zarr"), *t],
         "--logits topk:K needs K, a whole number of classes a row, got 'topk:-1'"),
        ("sample of no classes", ["extract", "--teachers", "resnet8_w4", "--logits", "sample:0", "--out",
                                  str(root / "k0.zarr"), *t],
         "--logits sample:K needs K of at least 1 (all: every logit), got 0"),
        ("unknown logits encoding", ["extract", "--teachers", "resnet8_w4", "--logits", "tpok:5", "--out",
                                     str(root / "k0.zarr"), *t],
         "unknown --logits encoding 'tpok'; choose one of: sample, topk; did you mean topk?"),
        ("logits without an encoding", ["extract", "--teachers", "resnet8_w4", "--logits", "10", "--out",
                                        str(root / "k0.zarr"), *t],
         "--logits takes all (every logit) or NAME:K (sample:K, topk:K), got '10'"),
        ("logits temperature of zero", ["extract", "--teachers", "resnet8_w4", "--logits", "sample:8",
                                        "--logits-temperature", "0", "--out", str(root / "k0.zarr"), *t],
         "--logits-temperature must be a positive number, got 0.0"),
        ("top-k beyond the classes", ["extract", "--teachers", "resnet8_w4", "--logits", "topk:11", "--out",
                                      str(root / "k11.zarr"), *t], "--logits topk:11 keeps more than teacher"),
        ("unknown --policy", ["extract", "--teachers", "resnet8_w4", "--policy", "autoaugment", "--out",
                              str(root / "s.zarr"), *t], "unknown --policy 'autoaugment'"),
        ("mix probability above 1", ["extract", "--teachers", "resnet8_w4", "--cutmix", "1", "--mix-prob", "1.5",
                                     "--out", str(root / "mix.zarr"), *t], "Invalid value for '--mix-prob'"),
        ("divergent views from one teacher", ["extract", "--teachers", "resnet8_w4", "--divergent-views", "1",
                                              "--out", str(root / "div.zarr"), *t], "name at least two teachers"),
        ("unknown --for method", ["extract", "--teachers", "resnet8_w4", "--for", "mael", "--out",
                                  str(root / "for.zarr"), *t], "unknown --for method 'mael'"),
        ("negative workers", ["train", "--arch", "resnet8", "--workers", "-1", "--out", out],
         "--workers must be 0 or more decoding processes, got -1"),
        ("crops not dividing the batch", ["distill", "--store", str(store), "--student", "resnet8",
                                          "--crops-per-image", "3", "--out", str(root / "d8"), *d],
         "--batch-size 64 must be a multiple of --crops-per-image 3"),
        ("no discriminator named", ["distill", "--store", str(store), "--student", "resnet8", "--discriminators", " , ",
                                    "--out", str(root / "d9"), *d], "name blocks, output, both"),
        ("block discriminators without blocks", ["distill", "--store", str(store), "--student", "resnet8", "--method",
                                                 "kd", "--discriminators", "blocks", "--out", str(root / "d10"), *d],
         "--discriminators blocks needs block terms, which --method kd has not"),
        ("adversarial settings for a method without discriminators",
         ["distill", "--store", str(store), "--student", "resnet8", "--method", "dkd", "--adv-weight", "0.5",
          "--disc-lr", "1e-3", "--out", str(root / "d11"), *d],
         "--method dkd trains no discriminators: --adv-weight, --disc-lr is not read"),
        ("existing checkpoint", ["train", "--arch", "resnet8", "--epochs", "1", "--out", str(root / "existing.pt")],
         "exists; pass --resume"),
        ("existing store, other settings", ["extract", "--teachers", "resnet8_w4", "--views", "5", "--out",
                                            str(store), *t], "pass --overwrite"),
        ("non-empty run directory", ["distill", "--store", str(store), "--student", "resnet8", "--out",
                                     str(root / "run"), *d], "is not empty"),
        ("CUDA without a GPU", ["train", "--arch", "resnet8", "--device", "cuda", "--out", out],
         "no CUDA GPU is available"),
        ("bad memory size", ["distill", "--store", str(store), "--student", "resnet8", "--max-memory", "lots",
                             "--out", str(root / "d5"), *d], "--max-memory takes a size"),
        ("zero temperature", ["distill", "--store", str(store), "--student", "resnet8", "--temperature", "0",
                              "--out", str(root / "d6"), *d], "--temperature must be > 0, got 0"),
        ("label refinement without hard labels", ["distill", "--store", str(store), "--student", "resnet8",
                                                  "--refine-labels", "--out", str(root / "d7"), *d],
         "--refine-labels replaces hard labels"),
        ("pipeline with a typo", ["run", str(root / "bad.toml")], "unknown setting(s) viewz"),
        ("unknown command", ["distil"], "No such command 'distil'"),
    ]  # fmt: skip


CASE_NAMES = [name for name, _, _ in _cases(Path("/x"), Path("/y"))]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_gives_one_line_and_exit_2(world, case):
    root, store = world
    _, args, message = next(c for c in _cases(root, store) if c[0] == case)
    before = _snapshot(root) | _snapshot(store)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # The runner keeps a traceback out of the output; an exception other than the exit is what would print one.
    assert isinstance(result.exception, SystemExit), result.exc_info
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], lines[0]
    assert _snapshot(root) | _snapshot(store) == before, "a refused command changed a file"


# What the process may write at most to any one file (RLIMIT_FSIZE): the store's metadata and its labels, views,
# logits and deep blocks fit, the first teacher's layer1 maps (about 200 kB a 512-row chunk) do not, so the kernel
# refuses a write (EFBIG) once the store exists and its teacher outputs are being written.
FILE_SIZE_LIMIT = 100_000


def _console_cases(root: Path, store: Path) -> list[tuple[str, list[str], str]]:
    t = ["--teacher-dir", str(root / "teachers"), "--device", "cpu", "--quiet"]
    damaged = root / "damaged.zarr"
    return [
        ("damaged store", ["distill", "--store", str(damaged), "--student", "resnet8_w4", "--epochs", "1",
                           "--device", "cpu", "--out", str(root / "d6"), "--quiet"],
         f"store '{damaged}' is damaged: teachers/resnet8_w4/logits chunk (0, 0, 0): missing"),
        ("failed write", ["extract", "--teachers", "resnet8_w4", "--views", "1", "--out", str(root / "full.zarr"),
                          *t], f"writing the store '{root / 'full.zarr'}' failed: File too large"),
        ("store URL without its filesystem package", ["info", "s3://bucket/feats.zarr"], "install 'meal-cache[s3]'"),
        ("truncated JPEG", ["extract", "--teachers", "resnet8_w4", "--data", f"imagefolder:{root / 'truncated'}",
                            "--image-size", "16", "--views", "1", "--workers", "2", "--out",
                            str(root / "truncated.zarr"), *t],
         "c03/1.jpg' cannot be decoded (Image is incomplete or truncated.)"),  # the reason, no decoder source path
        ("image file changed since extract", ["distill", "--store", str(root / "changed.zarr"), "--student",
                                              "resnet8_w4", "--epochs", "1", "--device", "cpu", "--out",
                                              str(root / "d9"), "--quiet"], "its dataset fingerprint differs"),
        ("store URL of an unknown protocol", ["info", "nosuchfs://bucket/feats.zarr"], "Protocol not known"),
        ("negative --cutmix alpha", ["extract", "--teachers", "resnet8_w4", "--cutmix", "-1", "--out",
                                     str(root / "cutmix.zarr"), *t], "Invalid value for '--cutmix': -1.0 is not in"),
        ("divergent bound outside [0, 1]", ["extract", "--teachers", "resnet8_w4,densenet_k12", "--divergent-views",
                                            "1", "--divergent-eps", "1.5", "--out", str(root / "div.zarr"), *t],
         "--divergent-eps is a fraction of the pixel range in [0, 1] (8/255 = 0.031), got 1.5"),
        # Two rows other test files run in click's runner, once as a process too.
        ("fold out of range", ["train", "--arch", "resnet8", "--data", "digits?folds=5&fold=5", "--out",
                               str(root / "new.pt")], "fold must be in 0..4 for folds=5, got 5"),
        ("evaluate against a store of another split", ["evaluate", str(root / "teachers" / "resnet8_w4.pt"),
                                                       "--store", str(store), "--device", "cpu", "--json",
                                                       str(root / "never.json")],
         "it caches the train split, not test"),
    ]  # fmt: skip


# Cases that fail while writing a store: it stays, unfinished and resumable.
PARTIAL_STORES = {"failed write": "full.zarr", "truncated JPEG": "truncated.zarr"}
CONSOLE_CASE_NAMES = [name for name, _, _ in _console_cases(Path("/x"), Path("/y"))]


def _console_script() -> list[str]:
    """The installed `meal-cache` command (what a user runs), or the module where the project is not installed."""
    script = Path(sys.executable).with_name("meal-cache")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "meal_cache"]


def _with_file_size_limit(command: list[str], limit: int) -> list[str]:
    """``command`` exec'd by a Python that first lowers the largest file the process may write to ``limit``."""
    code = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "os.execv(sys.argv[2], sys.argv[2:])")  # fmt: skip
    return [sys.executable, "-c", code, str(limit), *command]


def _without_s3fs(folder: Path) -> dict[str, str]:
    """An environment in which ``import s3fs`` fails, as where the s3 extra is not installed (the dev extra
    installs it for tests/test_s3.py): a module of that name first on PYTHONPATH that raises ImportError."""
    hidden = folder / "without-s3fs"
    hidden.mkdir(exist_ok=True)
    (hidden / "s3fs.py").write_text("raise ImportError('s3fs is hidden by the test')\n")
    path = os.pathsep.join(filter(None, [str(hidden), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path}


def _this_tree() -> dict[str, str]:
    """The environment with this tree first on PYTHONPATH: the installed command may be an editable install of
    another checkout (a worktree's tests would otherwise run main's code)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}


@pytest.mark.parametrize("case", CONSOLE_CASE_NAMES)
def test_bad_input_through_the_console_script_gives_one_line_and_exit_2(world, case, tmp_path):
    root, store = world
    _, args, message = next(c for c in _console_cases(root, store) if c[0] == case)
    if case == "damaged store" and not (root / "damaged.zarr").exists():
        shutil.copytree(store, root / "damaged.zarr")
        (root / "damaged.zarr" / "teachers" / "resnet8_w4" / "logits" / "c" / "0" / "0" / "0").unlink()
    command = [*_console_script(), *args]
    if case == "failed write":
        command = _with_file_size_limit(command, FILE_SIZE_LIMIT)
    environment = _without_s3fs(tmp_path) if case == "store URL without its filesystem package" else _this_tree()
    before = _snapshot(root) | _snapshot(store)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]
    assert message in lines[0], lines[0]
    after = _snapshot(root) | _snapshot(store)
    if case in PARTIAL_STORES:  # the store it was writing stays, resumable; nothing else is new
        partial = str(root / PARTIAL_STORES[case])
        assert any(p.startswith(partial + "/") for p in after), "the partial store was removed"
        after = {p: v for p, v in after.items() if not p.startswith(partial + "/")}
    assert after == before, "a refused command changed a file"


def test_errors_doc_lists_every_case():
    text = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for name, _, _ in _console_cases(Path("/x"), Path("/y")):
        assert f"| {name} |" in text, name
    for name, _, message in _cases(Path("/x"), Path("/y")):
        assert f"| {name} |" in text, name
        assert message.replace("|", "\\|") in text, message
    assert len(CASE_NAMES) >= 20
