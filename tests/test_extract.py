from __future__ import annotations

import dataclasses
import json

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import meal_cache.extract.finite as extract_finite
import meal_cache.extract.run as extract_module
from meal_cache.cli import main
from meal_cache.errors import UserError
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.nets.checkpoint import load_model
from meal_cache.nets.taps import BlockTap
from meal_cache.store import describe_store, open_store, verify_store
from meal_cache.views import augment


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return (
        {name: array[:] for name, array in group.arrays()}
        | {f"{prefix}/{name}": array[:] for prefix in ("views",) for name, array in group[prefix].arrays()}
        | _teacher_arrays(group)
    )


def _teacher_arrays(group) -> dict[str, np.ndarray]:
    out = {}
    for key in group["teachers"]:
        base = group[f"teachers/{key}"]
        out[f"{key}/logits"] = base["logits"][:]
        out[f"{key}/progress"] = base["progress"][:]
        for kind in ("blocks", "maps"):
            for name, array in base[kind].arrays():
                out[f"{key}/{kind}/{name}"] = array[:]
    return out


def _assert_same_store(a, b) -> None:
    left, right = _arrays(a), _arrays(b)
    assert sorted(left) == sorted(right)
    for key in left:
        assert np.array_equal(left[key], right[key]), key
    attrs_a = dict(zarr.open_group(str(a), mode="r").attrs)
    attrs_b = dict(zarr.open_group(str(b), mode="r").attrs)
    assert attrs_a == attrs_b


def test_replay_reproduces_stored_outputs(small_store, teacher_dir, digits):
    path, config = small_store
    store = open_store(path)
    rng = np.random.default_rng(0)
    for key in ("resnet8_w4", "densenet_k12"):
        model, payload = load_model(teacher_dir / f"{key}.pt")
        for _ in range(3):
            view, row = int(rng.integers(store.num_views)), int(rng.integers(store.n))
            params = store.view_params(view)[row : row + 1]
            image = digits.train.images[row : row + 1]
            batch = augment.apply(image, params, payload["input"]["mean"], payload["input"]["std"])
            with BlockTap(model) as tap, torch.no_grad():
                logits = model(batch)
            stored = store.logits(key, view)[row].astype(np.float32)
            np.testing.assert_allclose(stored, logits[0].numpy(), rtol=2e-3, atol=2e-3)
            for block in store.blocks(key):
                out = tap.outputs[block.name][0]
                pooled = torch.nn.functional.adaptive_avg_pool2d(out, block.grid).numpy()
                stored_block = store.feature(key, "blocks", block.key, view)[row].astype(np.float32)
                np.testing.assert_allclose(stored_block, pooled, rtol=2e-3, atol=2e-3)
                stored_map = store.feature(key, "maps", block.key, view)[row].astype(np.float32)
                np.testing.assert_allclose(stored_map, out.mean(0).numpy(), rtol=2e-3, atol=2e-3)


def test_store_layout_opens_with_plain_zarr_and_dask(small_store, digits):
    path, _ = small_store
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    assert attrs["format"] == "meal-cache/11" and attrs["complete"] is True
    assert attrs["dataset"]["fingerprint"] == digits.fingerprint("train") and attrs["dataset"]["n"] == 1437
    assert attrs["views"] == {"count": 3, "augmented": 2, "identity": True, "recipe": "digits", "seed": 0}
    resnet = attrs["teachers"]["resnet8_w4"]
    assert [b["name"] for b in resnet["blocks"]] == ["layer1", "layer2", "layer3"]
    assert [(b["channels"], b["grid"], b["map"]) for b in resnet["blocks"]] == [
        (4, 2, [16, 16]),
        (8, 2, [8, 8]),
        (16, 2, [4, 4]),
    ]
    assert len(resnet["accuracy"]) == 3 and resnet["accuracy"][-1] > 30
    assert len(resnet["checkpoint_sha256"]) == 64
    assert group["labels"].shape == (1437,) and np.array_equal(group["labels"][:], digits.train.labels.numpy())
    assert group["views/crop"].shape == (3, 1437, 4) and group["views/crop"].dtype == np.int16
    assert group["views/flip"].shape == (3, 1437) and not group["views/flip"][:].any()  # digits never flip
    # The identity view is the whole image.
    assert (group["views/crop"][2] == np.array([0, 0, 16, 16])).all()
    logits = da.from_zarr(str(path), component="teachers/resnet8_w4/logits")
    assert logits.shape == (3, 1437, 10) and logits.dtype == np.float16
    assert logits.chunksize == (1, 256, 10)
    dense = da.from_zarr(str(path), component="teachers/densenet_k12/blocks/features.denseblock3")
    assert dense.shape == (3, 1437, 90, 2, 2)
    maps = da.from_zarr(str(path), component="teachers/densenet_k12/maps/features.denseblock1")
    assert maps.shape == (3, 1437, 16, 16)
    # Stored accuracy agrees with what dask computes from the stored logits.
    predicted = logits.argmax(axis=2).compute()
    assert resnet["accuracy"][0] == pytest.approx(100 * (predicted[0] == group["labels"][:]).mean(), abs=1e-3)
    assert group["teachers/resnet8_w4/progress"][:].all()


def test_same_seed_gives_identical_stores(small_store, tmp_path, digits):
    path, config = small_store
    again = tmp_path / "again.zarr"
    extract(config, again, progress=False, dataset=digits)
    _assert_same_store(path, again)


def test_killed_extract_resumes_to_the_same_store(small_store, tmp_path, digits, monkeypatch, interrupt_on_call):
    path, config = small_store
    target = tmp_path / "killed.zarr"
    real = extract_module.store_arrays
    # Chunk by chunk, every view of a chunk from one render, each (view, chunk) written when both teachers are
    # done with it: the 9th teacher-(view, chunk) is the first teacher's of view 1 of chunk 1, after chunk 0's
    # three views and chunk 1's view 0, so the resumed chunk 1 is asked for its two other views only.
    undo = interrupt_on_call(extract_module, "store_arrays", 9)
    with pytest.raises(KeyboardInterrupt):
        extract(config, target, progress=False, dataset=digits)
    partial = open_store(target)
    assert not partial.complete
    for teacher in ("resnet8_w4", "densenet_k12"):
        marks = partial.progress(teacher)
        assert marks.sum() == 4 and marks[:, 0].all() and marks[0, 1] and not marks[1:, 1].any()
    with pytest.raises(UserError, match="incomplete"):
        partial.check_matches(digits.describe(), "train")

    undo()
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "store_arrays", counting)
    extract(config, target, progress=False, dataset=digits)
    total_chunks = 2 * 3 * 6  # teachers x views x chunks
    assert counted["n"] == total_chunks - 8
    _assert_same_store(path, target)


def test_other_settings_are_refused_unless_overwrite(small_store, tmp_path, digits):
    _, base = small_store
    config = dataclasses.replace(base, teachers=["resnet8_w4"], views=1, identity_view=False)
    target = tmp_path / "s.zarr"
    extract(config, target, progress=False, dataset=digits)
    other = dataclasses.replace(config, views=2, seed=1)  # more views alone would grow it (tests/test_grow.py)
    with pytest.raises(UserError, match="other settings.*seed: 0 there, 1 now"):
        extract(other, target, progress=False, dataset=digits)
    store = extract(other, target, overwrite=True, progress=False, dataset=digits)
    assert store.num_views == 2 and store.complete


def test_fingerprint_follows_the_dataset(teacher_dir, tmp_path, digits):
    from meal_cache.data.datasets import ImageDataset, Split

    labels = digits.train.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    changed = ImageDataset(**{**digits.__dict__, "train": Split(digits.train.images, labels)})
    config = ExtractConfig(teachers=["resnet8_w4"], views=1, teacher_dir=str(teacher_dir), device="cpu")
    a = extract(config, tmp_path / "a.zarr", progress=False, dataset=digits)
    b = extract(config, tmp_path / "b.zarr", progress=False, dataset=changed)
    assert a.dataset["fingerprint"] != b.dataset["fingerprint"]
    a.check_matches(digits.describe(), "train")
    with pytest.raises(UserError, match="fingerprint differs"):
        b.check_matches(digits.describe(), "train")


def test_teacher_errors_name_the_choices(teacher_dir, digits, tmp_path):
    config = ExtractConfig(teachers=["resnet"], teacher_dir=str(teacher_dir), device="cpu")
    with pytest.raises(UserError, match="teacher 'resnet' not found.*densenet_k12, resnet8_w4"):
        extract(config, tmp_path / "x.zarr", progress=False, dataset=digits)
    config = ExtractConfig(teachers=["resnet8_w4"], blocks="layer9", teacher_dir=str(teacher_dir), device="cpu")
    with pytest.raises(UserError, match="unknown block.*layer1, layer2, layer3"):
        extract(config, tmp_path / "x.zarr", progress=False, dataset=digits)


def test_last_k_blocks_and_channels_only(teacher_dir, digits, tmp_path):
    config = ExtractConfig(teachers=["densenet_k12"], views=1, blocks="1", features=["blocks"],
                           teacher_dir=str(teacher_dir), device="cpu")  # fmt: skip
    store = extract(config, tmp_path / "k.zarr", progress=False, dataset=digits)
    assert [b.name for b in store.blocks("densenet_k12")] == ["features.denseblock3"]
    assert "maps" not in zarr.open_group(str(tmp_path / "k.zarr"), mode="r")["teachers/densenet_k12"]


def test_cli_extract_and_info(teacher_dir, tmp_path):
    out = tmp_path / "cli.zarr"
    runner = CliRunner()
    args = ["extract", "--teachers", "resnet8_w4", "--data", "digits", "--views", "1", "--teacher-dir",
            str(teacher_dir), "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0
    for text in ("resnet8_w4", "logits", "maps/layer1", "bytes per sample per view", "complete"):
        assert text in info.output
    missing = runner.invoke(main, ["info", str(tmp_path / "nope.zarr")])
    assert missing.exit_code == 2 and "store not found" in missing.stderr
    # Another grid (more views alone would grow the store: tests/test_grow.py).
    again = runner.invoke(main, [*args[:-3], "--grid", "2", "--out", str(out), "--device", "cpu", "--quiet"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert json.loads(json.dumps(open_store(out).attrs))["complete"] is True


def test_bit_rounding_is_bounded_and_smaller(small_store, teacher_dir, digits, tmp_path):
    _, base = small_store
    exact_config = dataclasses.replace(base, teachers=["densenet_k12"], views=1, identity_view=False)
    exact = extract(exact_config, tmp_path / "exact.zarr", progress=False, dataset=digits)
    rounded = extract(dataclasses.replace(exact_config, keep_bits=3), tmp_path / "r.zarr", progress=False,
                      dataset=digits)  # fmt: skip
    assert rounded.layout.keep_bits == 3 and exact.layout.keep_bits is None
    for key in exact.feature_keys("densenet_k12"):
        a = exact.array(key)[:].astype(np.float32)
        b = rounded.array(key)[:].astype(np.float32)
        # Keeping 3 of float16's 10 mantissa bits: relative error at most 2^-4 (round to nearest); below
        # float16's smallest normal number (2^-14) the rounding step is absolute.
        assert np.all(np.abs(a - b) <= np.abs(a) * 2.0**-4 + 2.0**-14), key
        assert not np.array_equal(a, b)
        # The low 7 mantissa bits of every stored value are zero.
        bits = rounded.array(key)[:].view(np.uint16)
        assert not np.any(bits & 0x7F), key
    total = lambda store: sum(v["stored"] for v in store.sizes().values())  # noqa: E731
    assert total(rounded) < 0.8 * total(exact)
    assert "3 mantissa bits kept" in __import__("meal_cache.store", fromlist=["x"]).describe_store(rounded)
    with pytest.raises(UserError, match="--keep-bits must be between 1 and 10"):
        extract(dataclasses.replace(exact_config, keep_bits=11), tmp_path / "bad.zarr", progress=False, dataset=digits)


def test_quantized_store_decodes_features_within_half_a_step(small_store, teacher_dir, digits, tmp_path):
    path, config = small_store
    exact = open_store(path)
    quantized_config = dataclasses.replace(config, quantize=8)
    store = extract(quantized_config, tmp_path / "q8.zarr", progress=False, dataset=digits)
    assert store.array("teachers/resnet8_w4/maps/layer3").dtype == np.uint8
    assert store.array("teachers/resnet8_w4/logits").dtype == np.float16  # logits stay as --dtype
    for kind, block in (("maps", "layer3"), ("blocks", "layer2")):
        decoded = store.feature("resnet8_w4", kind, block, 1).astype(np.float32)
        original = exact.feature("resnet8_w4", kind, block, 1).astype(np.float32)
        rows = original.reshape(len(original), -1)
        half_step = (rows.max(1) - rows.min(1)) / 255 / 2
        error = np.abs(decoded - original).reshape(len(original), -1).max(1)
        # Half a step, plus float16's rounding of the decoded value.
        assert (error <= half_step + 2e-3 * np.abs(rows).max(1) + 1e-6).all()
        assert error.max() > 0  # it is lossy
    np.testing.assert_array_equal(store.logits("resnet8_w4", 0), exact.logits("resnet8_w4", 0))
    sizes, exact_sizes = store.sizes(), exact.sizes()
    key = "teachers/resnet8_w4/maps/layer1"
    assert sizes[key]["stored"] < 0.8 * exact_sizes[key]["stored"]
    assert verify_store(store).ok
    assert "8-bit codes" in describe_store(store)
    with pytest.raises(UserError, match="choose one"):
        extract(dataclasses.replace(config, quantize=8, keep_bits=4), tmp_path / "both.zarr", progress=False,
                dataset=digits)  # fmt: skip


def test_distill_reads_a_quantized_store(small_store, digits, tmp_path):
    from meal_cache.distill import DistillConfig, distill

    path, config = small_store
    store_path = tmp_path / "q8.zarr"
    extract(dataclasses.replace(config, quantize=8), store_path, progress=False, dataset=digits)
    for max_memory in (None, "300kB"):  # in memory, and streaming through a shuffle buffer
        summary = distill(DistillConfig(store=str(store_path), student="resnet8_w4", epochs=1, device="cpu",
                                        max_memory=max_memory), tmp_path / f"run-{max_memory}", progress=False,
                          dataset=digits)  # fmt: skip
        assert summary["history"][0]["steps"] == 1437 // 64 and np.isfinite(summary["history"][0]["loss"])


def _edited_teacher(teacher_dir, folder, name: str, edit) -> str:
    """A copy of the resnet8_w4 teacher saved as ``folder/name.pt`` with ``edit`` applied to its weights."""
    from meal_cache.nets.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(teacher_dir / "resnet8_w4.pt")
    weights = {k: v.clone() for k, v in payload["model"].items()}
    edit(weights)
    path = folder / f"{name}.pt"
    save_checkpoint(path, {**payload, "model": weights})
    return str(path)


def _loud(weights) -> None:
    # Logits of about 1e7: finite in float32, beyond float16's largest value (65504).
    weights["fc.weight"] *= 1e6


def test_outputs_beyond_float16_are_refused_and_the_store_stays_resumable(teacher_dir, digits, tmp_path):
    loud = _edited_teacher(teacher_dir, tmp_path, "loud", _loud)
    config = ExtractConfig(teachers=[str(teacher_dir / "resnet8_w4.pt"), loud], views=1, identity_view=True,
                           rows_per_chunk=512, device="cpu")  # fmt: skip
    out = tmp_path / "loud.zarr"
    with pytest.raises(UserError) as caught:
        extract(config, out, progress=False, dataset=digits)
    message = str(caught.value)
    assert "teacher 'loud'" in message and "logits" in message and "view 1 of 2" in message
    assert "float16" in message and "--dtype float32" in message
    # The other teacher's chunk is kept, no chunk of the loud one is marked done and none holds inf.
    store = open_store(out)
    assert not store.complete
    assert store.progress("resnet8_w4")[0, 0] and not store.progress("loud").any()
    assert np.isfinite(store.logits("loud", 0).astype(np.float32)).all()
    # As the message says: float32 holds them.
    store = extract(dataclasses.replace(config, dtype="float32"), out, overwrite=True, progress=False,
                    dataset=digits)  # fmt: skip
    logits = store.logits("loud", 0)
    assert store.complete and np.isfinite(logits).all() and np.abs(logits).max() > 65504


def test_a_teacher_that_gives_nan_in_float32_is_named_broken(teacher_dir, digits, tmp_path):
    def nan_bias(weights) -> None:
        weights["fc.bias"][3] = float("nan")

    broken = _edited_teacher(teacher_dir, tmp_path, "broken", nan_bias)
    config = ExtractConfig(teachers=[broken], views=1, dtype="float32", device="cpu")
    with pytest.raises(UserError, match="teacher 'broken' gives non-finite .*logits on view 1 of 1.*float32") as e:
        extract(config, tmp_path / "broken.zarr", progress=False, dataset=digits)
    assert "--dtype" not in str(e.value)  # a wider dtype would not help
    assert not open_store(tmp_path / "broken.zarr").progress("broken").any()


def test_overflow_through_the_console_script_is_one_error_line(teacher_dir, tmp_path):
    import os
    import subprocess
    import sys

    _edited_teacher(teacher_dir, tmp_path, "loud", _loud)
    command = [sys.executable, "-m", "meal_cache", "extract", "--teachers", "loud", "--teacher-dir", str(tmp_path),
               "--data", "digits", "--views", "1", "--out", str(tmp_path / "s.zarr"), "--device", "cpu",
               "--quiet"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "teacher 'loud'" in errors[0] and "logits" in errors[0] and "--dtype float32" in errors[0]


def test_bit_rounding_up_to_inf_is_caught_before_the_write():
    raw = {"logits": np.array([[1.0, 65504.0]], np.float32), "maps/layer1": np.ones((1, 2, 2), np.float32)}
    stored = {key: value.astype(np.float16) for key, value in raw.items()}
    config = ExtractConfig(teachers=["t"], keep_bits=4)
    extract_finite._check_finite(raw, stored, ExtractConfig(teachers=["t"]))  # finite in float16
    with pytest.raises(extract_finite.NonFiniteOutput) as caught:
        extract_finite._check_finite(raw, stored, config)
    assert caught.value.stage == "keep_bits" and caught.value.keys == ["logits"]
    assert "--keep-bits 4 rounds" in caught.value.explain("t", "view 1 of 1", slice(0, 1), config, None)


# ------------------------------------------------------------------------- every view of a chunk, one decode


def _untrained_teachers(folder, spec: str, size: int, archs=("resnet8_w4", "densenet_k12")) -> list[str]:
    """Teacher checkpoints with initial weights (what they output does not matter here, only that it is theirs)."""
    from meal_cache.data.datasets import load_dataset
    from meal_cache.nets.checkpoint import model_payload, save_checkpoint
    from meal_cache.nets.models import create_model

    dataset = load_dataset(spec, image_size=size)
    folder.mkdir(parents=True, exist_ok=True)
    for seed, arch in enumerate(archs):
        torch.manual_seed(seed)
        model = create_model(arch, dataset.num_classes, size)
        save_checkpoint(folder / f"{arch}.pt", model_payload(model, arch, dataset, {}, 0, [], {}))
    return list(archs)


def _per_view_outputs(config: ExtractConfig, store, dataset) -> dict[str, np.ndarray]:
    """Every teacher array of ``store`` as a view-by-view extract makes it: each view's rows asked of the source
    one mini-batch of that view at a time (one decode per view), each teacher run on those pixels, cast to the
    store's dtype; keyed by the store's array paths."""
    from meal_cache.extract.config import fitted_to_data
    from meal_cache.nets.teachers import resolve_teacher, teacher_outputs
    from meal_cache.runtime import Precision
    from meal_cache.store.keys import teacher_key

    resolved = fitted_to_data(config.resolved(), config, dataset.num_classes)
    precision = Precision(torch.device("cpu"))
    teachers = [resolve_teacher(n, resolved.teacher_dir, dataset, resolved.blocks, resolved.grid) for n in
                resolved.teachers]  # fmt: skip
    source = dataset.split("train").open(torch.device("cpu"), 0, decode="cpu")
    parts: dict[str, list[np.ndarray]] = {}
    for view in range(store.num_views):
        params = store.view_params(view)
        for start in range(0, store.n, config.rows_per_chunk):
            chunk_stop = min(store.n, start + config.rows_per_chunk)
            for first in range(start, chunk_stop, config.batch_size):
                stop = min(chunk_stop, first + config.batch_size)
                ((_, pixels),) = source.pixels([(torch.arange(first, stop), params[first:stop], None)])
                for teacher in teachers:
                    with torch.inference_mode():
                        outputs = teacher_outputs(teacher, pixels, tuple(resolved.features), precision)
                    for name, value in outputs.items():
                        key = f"{teacher_key(teacher.spec.key, name)}@{view}"
                        parts.setdefault(key, []).append(value.float().numpy().astype(resolved.dtype))
    source.close()
    return {key: np.concatenate(values) for key, values in parts.items()}


def test_every_view_of_a_chunk_from_one_decode_stores_what_view_by_view_extraction_stores(tmp_path):
    """Views with a policy's ops and CutMix partners, mini-batches that do not divide the chunks, two decoding
    workers: each teacher array of each view equals the one made from per-view requests, bit for bit."""
    from by_hand import store_arrays
    from imagefolder import make_image_folder

    from meal_cache.data.datasets import load_dataset

    folder = make_image_folder(tmp_path / "jpegs", classes=4, train=5, val=1, sizes=(40, 90))
    spec = f"imagefolder:{folder}"
    teachers = _untrained_teachers(tmp_path / "teachers", spec, 16)
    config = ExtractConfig(teachers=teachers, data=spec, image_size=16, views=3, identity_view=True,
                           policy="trivialaugment", cutmix=1.0, teacher_dir=str(tmp_path / "teachers"),
                           rows_per_chunk=8, batch_size=5, device="cpu", workers=2)  # fmt: skip
    store = extract(config, tmp_path / "s.zarr", progress=False)
    assert store.complete and store.mixing is not None and store.policy is not None
    expected = _per_view_outputs(config, store, load_dataset(spec, image_size=16))
    stored = store_arrays(zarr.open_group(str(tmp_path / "s.zarr"), mode="r"))
    outputs = {key for key in stored if key.startswith("teachers/") and not key.endswith("/progress")}
    assert {key.rsplit("@", 1)[0] for key in expected} == outputs  # logits, blocks and maps of both teachers
    for key, values in expected.items():
        path, view = key.rsplit("@", 1)
        assert stored[path].dtype == values.dtype and np.array_equal(stored[path][int(view)], values), key
