"""verify decodes a view's chunks in groups and one by one only where a group fails: a damaged chunk is found
wherever it sits, first, inside or last of its group, in the first group of a view or in the last, short one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from console import run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.engine.train import TrainConfig, train_supervised
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract
from meal_cache.store import open_store, verify_store
from meal_cache.store.verify import VERIFY_CHUNKS_AT_ONCE

SPEC = "digits?train_fraction=0.1"  # 143 training rows
ROWS_PER_CHUNK = 8  # 18 chunks a view: a group of 16 and a last group of 2
LOGITS = "teachers/resnet8_w4/logits"
BLOCK = "teachers/resnet8_w4/blocks/layer3"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A one-epoch teacher's logits and last block over 2 views of 143 rows, 8 rows a chunk."""
    root = tmp_path_factory.mktemp("verify")
    digits = load_dataset(SPEC)
    train_supervised(TrainConfig(arch="resnet8_w4", data=SPEC, epochs=1, device="cpu"),
                     root / "teachers" / "resnet8_w4.pt", progress=False, dataset=digits)  # fmt: skip
    config = ExtractConfig(teachers=["resnet8_w4"], data=SPEC, views=2, features=["blocks"], blocks="1",
                           rows_per_chunk=ROWS_PER_CHUNK, teacher_dir=str(root / "teachers"), device="cpu")  # fmt: skip
    extract(config, root / "feats.zarr", progress=False, dataset=digits)
    return root / "feats.zarr"


def _damaged_copy(store: Path, folder: Path, array: str, chunk: tuple[int, ...]) -> Path:
    """A copy of ``store`` with one byte of one chunk of ``array`` flipped (its checksum no longer matches)."""
    copy = folder / "damaged.zarr"
    shutil.copytree(store, copy)
    path = copy / array / "c" / Path(*map(str, chunk))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return copy


def test_the_store_is_sound_and_its_views_span_two_groups(store):
    opened = open_store(store)
    chunks = opened.n_chunks
    assert chunks == 18 and VERIFY_CHUNKS_AT_ONCE < chunks < 2 * VERIFY_CHUNKS_AT_ONCE
    report = verify_store(opened)
    assert report.ok and report.chunks_pending == 0 and report.chunks_checked > 4 * chunks


@pytest.mark.parametrize("row_chunk", list(range(18)))
@pytest.mark.parametrize(("array", "trailing"), [(LOGITS, (0,)), (BLOCK, (0, 0, 0))])
def test_verify_finds_a_damaged_chunk_at_every_position_of_a_group(store, tmp_path, array, trailing, row_chunk):
    chunk = (1, row_chunk, *trailing)
    damaged = _damaged_copy(store, tmp_path, array, chunk)
    found = [str(problem) for problem in verify_store(open_store(damaged)).problems]
    where = f"{array} chunk ({', '.join(map(str, chunk))})"
    assert found == [f"{where}: corrupt (Stored and computed checksum do not match)"]


def test_meal_cache_verify_lists_a_damaged_last_chunk_of_a_group_and_exits_1(store, tmp_path):
    last = VERIFY_CHUNKS_AT_ONCE - 1
    damaged = _damaged_copy(store, tmp_path, LOGITS, (0, last, 0))
    result = run_console(["verify", str(damaged), "--quiet"], tmp_path)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert result.stdout.startswith(f"{LOGITS} chunk (0, {last}, 0): corrupt"), result.stdout
    assert result.stdout.strip().endswith("1 damaged"), result.stdout


def test_a_chunk_that_equals_the_fill_value_is_stored_and_verifies(store, tmp_path):
    # A teacher whose every weight is zero gives zero logits and zero blocks, Zarr's fill value: such chunks must
    # still be written, or verify reads them as lost and distill refuses the store.
    teachers = store.parent / "teachers"
    payload = torch.load(teachers / "resnet8_w4.pt", weights_only=True)
    payload["model"] = {name: torch.zeros_like(value) for name, value in payload["model"].items()}
    torch.save(payload, tmp_path / "resnet8_w4.pt")
    config = ExtractConfig(teachers=["resnet8_w4"], data=SPEC, views=1, features=["blocks"], blocks="1",
                           rows_per_chunk=ROWS_PER_CHUNK, teacher_dir=str(tmp_path), device="cpu")  # fmt: skip
    extract(config, tmp_path / "zeros.zarr", progress=False)
    opened = open_store(tmp_path / "zeros.zarr")
    assert not opened.read(LOGITS, 0).any() and not opened.read(BLOCK, 0).any()
    report = verify_store(opened)
    assert report.ok, [str(problem) for problem in report.problems[:3]]
    assert (tmp_path / "zeros.zarr" / LOGITS / "c" / "0" / "0" / "0").is_file()
