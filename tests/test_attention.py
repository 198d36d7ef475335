"""AT compares what the paper compares (issue 44): the stored attention is the channel mean of |A|^p of the
teachers' blocks, signed or not, the student's is computed the same way at the store's p, and the loss is the
paper's on normalised maps (mdistiller's reduction); stores without attention and another p are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from by_hand import first_rows
from console import one_error_line, one_error_line_in_process, run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.distill import DistillConfig
from meal_cache.distill.methods.at import attention_loss
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_checkpoint, model_from_checkpoint
from meal_cache.nets.teachers import channel_attention
from meal_cache.store import feature_key, open_store

SPEC = "digits?train_fraction=0.1"  # 143 training rows
TEACHER = "densenet_k12"  # its dense blocks output raw conv features: signed


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset(SPEC)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, small_digits):
    """A densenet_k12 teacher trained two epochs on the 143 rows."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    folder = tmp_path_factory.mktemp("attention-teachers")
    config = TrainConfig(arch=TEACHER, data=SPEC, epochs=2, batch_size=32, seed=0, device="cpu")
    train_supervised(config, folder / f"{TEACHER}.pt", progress=False, dataset=small_digits)
    return folder


def _extract(teacher_dir, small_digits, out, **settings):
    config = ExtractConfig(teachers=[TEACHER], data=SPEC, teacher_dir=str(teacher_dir), batch_size=512, device="cpu",
                           **settings)  # fmt: skip
    return extract(config, out, progress=False, dataset=small_digits)


@pytest.fixture(scope="module")
def at_store_p3(tmp_path_factory, teacher_dir, small_digits):
    """``extract --for at --attention-p 3``: an odd p, where |A|^p and A^p differ."""
    out = tmp_path_factory.mktemp("attention-stores") / "at3.zarr"
    _extract(teacher_dir, small_digits, out, views=1, preset="at", attention_p=3.0)
    return out


def _block_outputs(checkpoint, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Every block's output over ``images`` (uint8, un-augmented) in float64, captured with forward hooks."""
    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload).eval()
    mean = torch.tensor(payload["input"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(payload["input"]["std"]).view(1, -1, 1, 1)
    seen: dict[str, np.ndarray] = {}
    for name in model.block_names:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, output, name=name: seen.__setitem__(name, output.detach().double().numpy()))  # fmt: skip
    with torch.no_grad():
        model((images.float() / 255.0 - mean) / std)
    return seen


@pytest.mark.parametrize("p", [1, 2, 3])
def test_stored_attention_is_the_channel_mean_of_abs_a_to_the_p(teacher_dir, small_digits, tmp_path, p):
    # The identity view: the teacher saw the images as they are, so the hooks below see what extract's did.
    store = _extract(teacher_dir, small_digits, tmp_path / "a.zarr", views=0, identity_view=True,
                     features=["attention"], attention_p=float(p))  # fmt: skip
    assert store.attrs["format"] == "meal-cache/11" and store.layout.attention_p == p
    outputs = _block_outputs(teacher_dir / f"{TEACHER}.pt", small_digits.train.images)
    blocks = store.blocks(TEACHER)
    assert [b.name for b in blocks] == list(outputs)  # every block
    for block in blocks:
        activation = outputs[block.name]
        assert (activation < 0).mean() > 0.2, block.name  # signed outputs, where the absolute value matters
        expected = (np.abs(activation) ** p).mean(1)
        stored = store.read(feature_key(TEACHER, "attention", block.key), store.identity_view).astype(np.float64)
        # float16 keeps about 3 significant digits.
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=1e-4 * expected.max())
        signed = activation.mean(1)
        assert not np.allclose(stored, signed, rtol=0.1, atol=0.1 * np.abs(signed).max())  # not the maps


def test_the_students_attention_and_the_loss_follow_the_stores_p(at_store_p3, small_digits):
    store = open_store(at_store_p3)
    assert store.layout.features == ("attention",) and store.layout.attention_p == 3.0
    assert store.layout.quantize == 8 and len(store.blocks(TEACHER)) == 3
    config = DistillConfig(store=str(at_store_p3), student="resnet8_w4", method="at",
                           device="cpu").resolved(store.layout.features)  # fmt: skip
    method, images, targets, labels = first_rows(config, small_digits)
    seen = {}
    for name in method.student.block_names:
        method.student.get_submodule(name).register_forward_hook(
            lambda _m, _i, output, name=name: seen.__setitem__(name, output.detach().double().numpy()))  # fmt: skip
    out = method(method.batch(images, targets, labels, method.teachers))
    total = 0.0
    for rank in range(3):
        student = seen[method.student.block_names[-1 - rank]]
        teacher = targets[feature_key(TEACHER, "attention", store.blocks(TEACHER)[-1 - rank].key)].double().numpy()
        student_map = (np.abs(student) ** 3).mean(1)
        assert student_map.shape == teacher.shape  # resnet8's grids are densenet_k12's: no pooling here
        rows = len(student_map)
        s = student_map.reshape(rows, -1)
        t = teacher.reshape(rows, -1)
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        total += float(((s - t) ** 2).mean())  # over rows and positions (mdistiller's), summed over blocks
    assert float(out.losses["attention"].detach()) == pytest.approx(1000.0 * total, rel=1e-4)
    assert float(out.losses["hard"].detach()) == pytest.approx(float(F.cross_entropy(out.logits.detach(), labels)))


def test_attention_maps_and_their_loss_on_a_hand_example():
    # Two channels of a 2x2 map, signed: mean |A|^p per position.
    activation = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 2.0], [4.0, -1.0]]]])
    assert channel_attention(activation, 1).tolist() == [[[1.0, 2.0], [2.0, 2.0]]]
    assert channel_attention(activation, 2).tolist() == [[[1.0, 4.0], [8.0, 5.0]]]
    assert channel_attention(activation, 3).tolist() == [[[1.0, 8.0], [32.0, 14.0]]]
    # The paper's distance between the normalised flattened maps, per row; the mean over rows and positions.
    student = [[1.0, 2.0, 3.0, 4.0], [2.0, 0.0, 0.0, 1.0]]
    teacher = [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    squared = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        s_norm, t_norm = math.sqrt(sum(v * v for v in s_row)), math.sqrt(sum(v * v for v in t_row))
        squared += sum((a / s_norm - b / t_norm) ** 2 for a, b in zip(s_row, t_row, strict=True))
    expected = squared / (2 * 4)
    loss = attention_loss(torch.tensor(student).view(2, 2, 2), torch.tensor(teacher).view(2, 2, 2))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_at_distils_end_to_end_from_a_for_at_store(teacher_dir, tmp_path):
    store = tmp_path / "at.zarr"
    made = run_console(["extract", "--teachers", TEACHER, "--teacher-dir", str(teacher_dir), "--data", SPEC,
                        "--for", "at", "--views", "1", "--device", "cpu", "--out", str(store)], tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    assert "features attention (mean |A|^2 over channels), lossy: attention as 8-bit codes" in made.stdout
    layout = open_store(store).layout
    assert layout.features == ("attention",) and layout.attention_p == 2.0 and layout.quantize == 8
    run = run_console(["distill", "--store", str(store), "--student", "resnet8_w4", "--method", "at", "--epochs", "6",
                       "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"],
                      tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    attention = [r["attention"] for r in records]
    assert len(attention) == 6 and all(math.isfinite(a) and a > 0 for a in attention)
    assert attention[-1] < 0.25 * attention[0], attention  # the student's maps move toward the teacher's
    assert (tmp_path / "run" / "student.pt").is_file()


@pytest.fixture(scope="module")
def maps_store(tmp_path_factory, teacher_dir, small_digits):
    """A store of the signed channel-mean maps only (what ``--for at`` stored before the attention kind)."""
    out = tmp_path_factory.mktemp("maps-stores") / "maps.zarr"
    _extract(teacher_dir, small_digits, out, views=1, features=["maps"], blocks="3")
    return out


def test_at_refuses_a_store_of_signed_maps_only_naming_for_at(maps_store, tmp_path):
    line = one_error_line(run_console(["distill", "--store", str(maps_store), "--student", "resnet8_w4", "--method",
                                       "at", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "r")],
                                      tmp_path))  # fmt: skip
    assert "holds the signed channel-mean maps (maps) and no attention maps" in line, line
    assert "extract with --for at again" in line, line


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("p=2", "--method-option p=2 of --method at differs from the p of the store's attention maps (mean |A|^3"),
        ("p=-1", "--method-option p of --method at is the power of |A| in the attention maps, a number above 0"),
    ],
)
def test_at_refuses_another_p_than_the_stores(at_store_p3, tmp_path, option, named):
    line = one_error_line_in_process(["distill", "--store", str(at_store_p3), "--student", "resnet8_w4", "--method",
                                      "at", "--method-option", option, "--epochs", "1", "--device", "cpu", "--out",
                                      str(tmp_path / "r")])  # fmt: skip
    assert named in line, line
    assert not (tmp_path / "r" / "student.pt").exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--for", "at", "--attention-p", "0"], "--attention-p is the power of |A| in the stored attention maps"),
        (["--features", "blocks", "--attention-p", "3"], "--features blocks stores none: add --features attention"),
        (["--dense", "--features", "attention"], "--features attention asks for attention maps of each view"),
    ],
)
def test_extract_refuses_attention_settings_it_cannot_honour(teacher_dir, tmp_path, extra, named):
    out = tmp_path / "s.zarr"
    line = one_error_line_in_process(["extract", "--teachers", TEACHER, "--teacher-dir", str(teacher_dir), "--data",
                                      SPEC, "--device", "cpu", *extra, "--out", str(out)])  # fmt: skip
    assert named in line, line
    assert not out.exists()


def test_a_dense_stores_targets_refuse_attention_keys(teacher_dir, small_digits, tmp_path):
    from meal_cache.dense import DenseTargets
    from meal_cache.errors import UserError

    store = _extract(teacher_dir, small_digits, tmp_path / "dense.zarr", dense=True, features=["blocks"], blocks="1")
    block = store.blocks(TEACHER)[0].key
    DenseTargets(store, [feature_key(TEACHER, "blocks", block)])  # what a dense store derives
    with pytest.raises(UserError, match=r"not channel-mean or attention maps \(teachers/densenet_k12/attention/"):
        DenseTargets(store, [feature_key(TEACHER, "attention", block)])


def test_online_teachers_compute_attention_at_the_stores_p(at_store_p3, teacher_dir, small_digits):
    """`--online` runs the teachers in the loop: their attention maps must be the cached ones, at the store's p."""
    from meal_cache.distill.feed import OnlineTeachers
    from meal_cache.runtime import Precision
    from meal_cache.views import augment

    store = open_store(at_store_p3)
    config = DistillConfig(store=str(at_store_p3), student="resnet8_w4", method="at", teachers=[TEACHER],
                           teacher_dir=str(teacher_dir), device="cpu")  # fmt: skip
    online = OnlineTeachers(config, store, small_digits, Precision(torch.device("cpu")))
    rows = torch.arange(32)
    computed = online.targets(augment.render(small_digits.train.images[rows], store.view_params(0)[rows]))
    for block in store.blocks(TEACHER):
        key = feature_key(TEACHER, "attention", block.key)
        cached = store.read(key, 0)[: len(rows)].astype(np.float64)
        scale = np.abs(cached).max()
        # 8-bit codes: within a step of the row's range; p = 2 would be off by far more.
        assert np.abs(computed[key].double().numpy() - cached).max() < 0.02 * scale, block.key
