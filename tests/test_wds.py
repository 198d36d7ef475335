"""``wds:LOCATION``: WebDataset tar shards streamed as image folders are, the same pixels bit for bit, replayed
through extract and distill, and refused in one line when a shard is bad (issue 40)."""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from console import one_error_line, one_error_line_in_process, run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.data.sources import wds
from meal_cache.errors import UserError
from meal_cache.views import augment

CPU = torch.device("cpu")
CLASSES = ("a-zero", "b-one", "c-two")  # sorted, so an image folder numbers them alike


def digit_samples(count: int = 60, seed: int = 0) -> list[tuple[str, int, str, bytes]]:
    """``(key, label, suffix, encoded image)``: scikit-learn's digits 0-2 upscaled to 28-48 px a side (each its
    own size), every fifth a PNG and the rest JPEGs, as shards and parquet files hold photographs."""
    from sklearn.datasets import load_digits
    from torchvision.io import encode_jpeg, encode_png
    from torchvision.transforms.v2 import functional as TF

    digits = load_digits()
    rng = np.random.default_rng(seed)
    picked = np.flatnonzero(digits.target < len(CLASSES))[:count]
    samples = []
    for number, row in enumerate(picked.tolist()):
        grey = torch.from_numpy((digits.images[row] * 15.9).astype(np.uint8))
        tint = torch.tensor([1.0, 0.8, 0.6])[:, None, None]  # three channels that differ
        image = (grey[None].float() * tint).to(torch.uint8)
        height, width = (int(v) for v in rng.integers(28, 49, size=2))
        image = TF.resize(image, [height, width], antialias=True).contiguous()
        suffix = "png" if number % 5 == 4 else "jpg"
        data = encode_png(image) if suffix == "png" else encode_jpeg(image, quality=90)
        samples.append((f"{row:05d}", int(digits.target[row]), suffix, data.numpy().tobytes()))
    return samples


def write_shards(folder: Path, samples, per_shard: int = 16, held_out: int = 15, label_in: str = "cls") -> Path:
    """``train-NNN.tar`` and ``val-NNN.tar`` of ``samples`` (the last ``held_out`` in val), ``per_shard`` a shard,
    written with webdataset's TarWriter, and ``classes.txt``."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": samples[:-held_out], "val": samples[-held_out:]}
    for split, rows in parts.items():
        for shard, start in enumerate(range(0, len(rows), per_shard)):
            with webdataset.TarWriter(str(folder / f"{split}-{shard:03d}.tar")) as sink:
                for key, label, suffix, data in rows[start : start + per_shard]:
                    target = {"cls": str(label)} if label_in == "cls" else {"json": json.dumps({"label": label})}
                    sink.write({"__key__": key, suffix: data, **target})
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


def write_folder(root: Path, samples, held_out: int = 15) -> Path:
    """The same images as an image folder, ``root/{train,val}/<class>/KEY.<suffix>``."""
    for split, rows in (("train", samples[:-held_out]), ("val", samples[-held_out:])):
        for key, label, suffix, data in rows:
            path = root / split / CLASSES[label] / f"{key}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


@pytest.fixture(scope="module", autouse=True)
def _index_cache(tmp_path_factory):
    """The shard index cache in this module's own folder, never the user's (the console scripts inherit it); the
    cache's own tests below each point it at their tmp_path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path_factory.mktemp("wds-index")))
        yield


@pytest.fixture(scope="module")
def samples():
    return digit_samples()


@pytest.fixture(scope="module")
def shards(samples, tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), samples)


def row_of_key(split) -> dict[str, int]:
    """Each row's key (its file or member name without the folder or shard and suffix) -> its row."""
    return {Path(name.decode()).stem: row for row, name in enumerate(split.files.tolist())}


def pixels_of(split, params: augment.ViewParams, workers: int = 0) -> torch.Tensor:
    source = split.open(CPU, workers, out_size=24, decode="cpu")
    rows = torch.arange(len(split))
    return next(source.pixels([(rows, params, None)]))[1]


def assert_same_pixels_as_folder(dataset, folder_dataset, workers: int = 0, keys: dict | None = None) -> None:
    """Every row of both splits renders the folder's pixels for its key (``keys[split]``, each row's, or the
    key in its name), in the evaluation view and in drawn random-resized crops with flips, boxes in each image's
    own coordinates."""
    for name in ("train", "test"):
        split, files = dataset.split(name), folder_dataset.split(name)
        split_keys = keys[name] if keys is not None else list(row_of_key(split))
        order = torch.tensor([row_of_key(files)[key] for key in split_keys])
        assert torch.equal(split.labels, files.labels[order])
        assert torch.equal(split.source_sizes(0), files.source_sizes(0)[order])
        recipe = augment.recipe_for(augment.FULL_RECIPE, 24)
        drawn = augment.draw(recipe, split.source_sizes(0), torch.Generator().manual_seed(3))
        for params in (split.eval_view(0), drawn):
            ours = pixels_of(split, params, workers)
            theirs = pixels_of(files.take(order), params, 0)
            assert torch.equal(ours, theirs), name
        assert bool(drawn.flip.any()) and not bool(drawn.flip.all())


def test_shards_serve_the_image_folders_pixels_bit_for_bit(samples, shards, tmp_path):
    dataset = load_dataset(f"wds:{shards}")
    folder = load_dataset(f"imagefolder:{write_folder(tmp_path / 'folder', samples)}")
    assert dataset.classes == CLASSES and dataset.streamed
    assert (len(dataset.train), len(dataset.test)) == (45, 15)
    assert_same_pixels_as_folder(dataset, folder, workers=2)


def test_a_brace_pattern_and_json_labels_give_the_same_rows(samples, shards, tmp_path):
    by_json = write_shards(tmp_path / "json", samples, label_in="json")
    pattern = load_dataset(f"wds:{by_json}/{{train-{{000..002}},val-000}}.tar")
    folder = load_dataset(f"wds:{shards}")
    assert len(pattern.train) == 45 and torch.equal(pattern.train.labels, folder.train.labels)
    assert pattern.fingerprint("train") == folder.fingerprint("train")  # same shard names, sizes, keys, labels
    assert (pattern.train.files == folder.train.files).all()


def test_without_classes_txt_the_classes_are_the_label_numbers(samples, tmp_path):
    folder = write_shards(tmp_path / "plain", samples)
    (folder / "classes.txt").unlink()
    assert load_dataset(f"wds:{folder}").classes == ("0", "1", "2")


# ------------------------------------------------------------------------------- train, extract, distill, replay


@pytest.fixture(scope="module")
def teachers(shards, tmp_path_factory):
    """Two teachers trained one epoch on the shards at 16 px."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    out = tmp_path_factory.mktemp("wds-teachers")
    for arch in ("resnet8_w4", "densenet_k12"):
        config = TrainConfig(arch=arch, data=f"wds:{shards}", image_size=16, epochs=1, batch_size=16, device="cpu",
                             workers=0)  # fmt: skip
        train_supervised(config, out / f"{arch}.pt", progress=False)
    return out


def extract_and_distill_replay(spec: str, teachers: Path, tmp_path: Path, monkeypatch) -> Path:
    """Extract 2 views + the identity view of ``spec``, distill 2 epochs from the store; checks that every
    batch's pixels are the ones the teacher was fed for those rows in that view, with its logits. Returns the
    store."""
    from by_hand import record_distill_steps, record_teacher_pixels
    from extract_order import fed_per_view

    from meal_cache.distill import DistillConfig, distill
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    fed_calls = record_teacher_pixels(monkeypatch, "resnet8_w4")
    config = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], data=spec, image_size=16, views=2,
                           identity_view=True, teacher_dir=str(teachers), rows_per_chunk=16, batch_size=8,
                           device="cpu", workers=2)  # fmt: skip
    path = tmp_path / "s.zarr"
    store = extract(config, path, progress=False)
    monkeypatch.undo()
    fed = fed_per_view(fed_calls, store.n, store.num_views, config.rows_per_chunk, config.batch_size)
    seen = record_distill_steps(monkeypatch, "teachers/resnet8_w4/logits")
    distill(DistillConfig(store=str(path), student="resnet8_w4", method="kd", epochs=2, batch_size=9, device="cpu",
                          workers=2), tmp_path / "run", progress=False)  # fmt: skip
    steps = store.n // 9
    assert len(seen) == 2 * steps
    for index, (rows, logits, pixels) in enumerate(seen):
        view = index // steps  # epoch e replays view e mod 2
        assert torch.equal(pixels, fed[view][rows]), (index, view)
        assert torch.equal(logits.half(), torch.from_numpy(store.logits("resnet8_w4", view))[rows])
    assert not torch.equal(fed[0], fed[1])
    epochs = [torch.cat([rows for rows, _, _ in seen[e * steps : (e + 1) * steps]]) for e in range(2)]
    assert all(len(set(rows.tolist())) == len(rows) for rows in epochs)  # no row twice in an epoch
    assert not torch.equal(epochs[0], epochs[1])  # shuffled anew each epoch
    return path


def test_extract_and_distill_replay_the_pixels_the_teachers_saw(shards, teachers, tmp_path, monkeypatch):
    path = extract_and_distill_replay(f"wds:{shards}", teachers, tmp_path, monkeypatch)
    from meal_cache.store import open_store

    assert open_store(path).dataset["kind"] == "wds"


def assert_an_interrupted_extract_resumes_to_the_whole_store(spec: str, teachers: Path, tmp_path: Path,
                                                              interrupt_on_call) -> None:  # fmt: skip
    """An extract of ``spec`` stopped (Ctrl-C) at its third chunk's write, then run again, writes the store an
    uninterrupted extract writes, array for array."""
    from test_faults import assert_same_store

    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract
    from meal_cache.store import open_store
    from meal_cache.store.teacher_store import TeacherStore

    config = ExtractConfig(teachers=["resnet8_w4"], data=spec, image_size=16, views=2, teacher_dir=str(teachers),
                           rows_per_chunk=16, batch_size=8, device="cpu", workers=1)  # fmt: skip
    undo = interrupt_on_call(TeacherStore, "write_rows", 3)
    with pytest.raises(KeyboardInterrupt):
        extract(config, tmp_path / "resumed.zarr", progress=False)
    undo()
    stopped = open_store(tmp_path / "resumed.zarr")
    done = stopped.array("teachers/resnet8_w4/progress")[:]
    assert not stopped.complete and 0 < done.sum() < done.size  # the writes run beside the teacher: not just 2
    extract(config, tmp_path / "resumed.zarr", progress=False)
    extract(config, tmp_path / "whole.zarr", progress=False)
    assert_same_store(tmp_path / "resumed.zarr", tmp_path / "whole.zarr")


def test_an_interrupted_extract_of_shards_resumes_to_the_whole_store(shards, teachers, tmp_path, interrupt_on_call):
    assert_an_interrupted_extract_resumes_to_the_whole_store(f"wds:{shards}", teachers, tmp_path, interrupt_on_call)


def test_a_changed_shard_is_refused_by_its_fingerprint(samples, teachers, tmp_path):
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    folder = write_shards(tmp_path / "d", samples)
    config = ExtractConfig(teachers=["resnet8_w4"], data=f"wds:{folder}", image_size=16, views=1,
                           teacher_dir=str(teachers), device="cpu", workers=0)  # fmt: skip
    extract(config, tmp_path / "s.zarr", progress=False)
    changed = list(samples)
    key, label, suffix, data = changed[3]
    changed[3] = (key, label, suffix, changed[4][3])  # another image under the same key
    write_shards(folder, changed)
    result = run_console(["distill", "--store", str(tmp_path / "s.zarr"), "--student", "resnet8_w4", "--epochs", "1",
                          "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"], tmp_path)  # fmt: skip
    assert "fingerprint differs" in one_error_line(result)


# ---------------------------------------------------------------------------------------------- the index cache


def count_header_reads(monkeypatch) -> list[str]:
    """The names of the shards whose tar headers are read from now on (wds._index_shard is the one reader)."""
    read: list[str] = []
    real = wds._index_shard

    def counted(place, path, size):
        read.append(posixpath.basename(path))
        return real(place, path, size)

    monkeypatch.setattr(wds, "_index_shard", counted)
    return read


def write_shard(path: Path, rows) -> None:
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for key, label, suffix, data in rows:
            sink.write({"__key__": key, suffix: data, "cls": str(label)})


def assert_index_is(dataset, folder: Path, shards: dict[str, list]) -> None:
    """The dataset's rows are ``shards``' samples (shard name -> its samples, train shards first, in order):
    their names, labels and each row's bytes as written, and its offsets and lengths the tar's own members'."""
    reader = dataset.train.reader
    expected = [(name, sample) for name, rows in shards.items() for sample in rows]
    assert reader.shards == tuple(str(folder / name) for name in shards)
    assert reader.names.tolist() == [f"{name}/{key}.{suffix}".encode() for name, (key, _, suffix, _) in expected]
    labels = torch.cat([dataset.train.labels, dataset.test.labels])
    assert labels.tolist() == [label for _, (_, label, _, _) in expected]
    members = []
    for name in shards:
        with tarfile.open(folder / name) as tar:
            members += [m for m in tar.getmembers() if m.name.rsplit(".", 1)[1] in ("jpg", "png")]
    assert reader.offsets.tolist() == [m.offset_data for m in members]
    assert reader.lengths.tolist() == [m.size for m in members]
    assert [reader.read(row) for row in range(len(expected))] == [data for _, (*_, data) in expected]


def shard_contents(samples) -> dict[str, list]:
    """write_shards' shards of ``samples``: shard name -> its samples."""
    train, val = samples[:-15], samples[-15:]
    return {**{f"train-{n:03d}.tar": train[s : s + 16] for n, s in enumerate(range(0, len(train), 16))},
            "val-000.tar": val}  # fmt: skip


def test_a_second_load_reads_no_tar_headers_and_gives_the_same_index_and_pixels(samples, tmp_path, monkeypatch):
    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "index"))
    folder = write_shards(tmp_path / "d", samples)
    read = count_header_reads(monkeypatch)
    cold = load_dataset(f"wds:{folder}")
    kept = list((tmp_path / "index").iterdir())
    assert sorted(read) == sorted(shard_contents(samples)) and len(kept) == 4
    umask = os.umask(0)
    os.umask(umask)
    assert all(path.stat().st_mode & 0o777 == 0o666 & ~umask for path in kept)  # the umask's, as a shared folder needs
    read.clear()
    warm = load_dataset(f"wds:{folder}")
    assert read == []
    for field in ("shards", "shard_bytes", "shard_of", "offsets", "lengths", "names"):
        ours, theirs = getattr(warm.train.reader, field), getattr(cold.train.reader, field)
        assert type(ours) is type(theirs) and np.array_equal(ours, theirs), field
        assert getattr(ours, "dtype", None) == getattr(theirs, "dtype", None), field
    for name in ("train", "test"):
        assert np.array_equal(warm.split(name).rows, cold.split(name).rows)
        assert torch.equal(warm.split(name).labels, cold.split(name).labels)
        assert torch.equal(pixels_of(warm.split(name), warm.split(name).eval_view(0)),
                           pixels_of(cold.split(name), cold.split(name).eval_view(0)))  # fmt: skip
    assert warm.fingerprint("train") == cold.fingerprint("train") and warm.classes == CLASSES
    assert_index_is(warm, folder, shard_contents(samples))


def test_a_rewritten_shard_is_indexed_again_and_the_others_come_from_the_cache(samples, tmp_path, monkeypatch):
    """train-001 rewritten with other samples (other keys, images and size); train-002 with the same images but
    other labels, so the same size and only its modification time tells (set a second on, as a rewrite a moment
    later is, whatever the file system's time resolution)."""
    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "index"))
    folder = write_shards(tmp_path / "d", samples)
    load_dataset(f"wds:{folder}")
    shards = shard_contents(samples)
    shards["train-001.tar"] = digit_samples(76)[60:]  # the same digits' next 16: keys and images not in a shard
    assert not {key for key, *_ in shards["train-001.tar"]} & {key for key, *_ in samples}
    shards["train-002.tar"] = [(key, (label + 1) % 3, suffix, data) for key, label, suffix, data in samples[32:45]]
    before = (folder / "train-002.tar").stat()
    for name in ("train-001.tar", "train-002.tar"):
        write_shard(folder / name, shards[name])
    assert (folder / "train-002.tar").stat().st_size == before.st_size
    os.utime(folder / "train-002.tar", ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    read = count_header_reads(monkeypatch)
    dataset = load_dataset(f"wds:{folder}")
    assert sorted(read) == ["train-001.tar", "train-002.tar"]
    assert_index_is(dataset, folder, shards)
    read.clear()
    assert_index_is(load_dataset(f"wds:{folder}"), folder, shards)
    assert read == []  # their new indexes were kept


def test_a_damaged_cache_file_is_ignored_and_rewritten(samples, tmp_path, monkeypatch):
    """Cut in half (as a write that was not atomic would leave it), not JSON, JSON of another shape, and
    well-formed JSON whose offsets lie past the shard's end: each shard is indexed from its headers again."""
    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "index"))
    folder = write_shards(tmp_path / "d", samples)
    load_dataset(f"wds:{folder}")
    cache = wds._IndexCache(tmp_path / "index")
    files = {name: cache._file(str(folder / name)) for name in shard_contents(samples)}
    text = files["train-000.tar"].read_text()
    files["train-000.tar"].write_text(text[: len(text) // 2])
    files["train-001.tar"].write_bytes(b"\x00" * 100)
    files["train-002.tar"].write_text("[1, 2, 3]")
    kept = json.loads(files["val-000.tar"].read_text())
    kept["offsets"] = [offset + 10**6 for offset in kept["offsets"]]
    files["val-000.tar"].write_text(json.dumps(kept))
    read = count_header_reads(monkeypatch)
    assert_index_is(load_dataset(f"wds:{folder}"), folder, shard_contents(samples))
    assert sorted(read) == sorted(files)
    read.clear()
    assert_index_is(load_dataset(f"wds:{folder}"), folder, shard_contents(samples))
    assert read == [] and not [p for p in (tmp_path / "index").iterdir() if p.suffix != ".json"]


def test_a_write_stopped_midway_leaves_no_cache_file(samples, tmp_path, monkeypatch):
    """A load stopped (Ctrl-C) halfway through writing a shard's index leaves neither a half file nor its
    temporary one, and the next load indexes that shard afresh (a SIGKILL can leave only a ``.tmp`` file, which
    nothing reads)."""
    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "index"))
    folder = write_shards(tmp_path / "d", samples)
    real = json.dump

    def stopped(content, out, **kwargs) -> None:
        out.write(json.dumps(content)[:100])
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(json, "dump", stopped)
        with pytest.raises(KeyboardInterrupt):
            load_dataset(f"wds:{folder}")
    assert json.dump is real and list((tmp_path / "index").iterdir()) == []
    read = count_header_reads(monkeypatch)
    assert_index_is(load_dataset(f"wds:{folder}"), folder, shard_contents(samples))
    assert len(read) == 4 and len(list((tmp_path / "index").iterdir())) == 4


def test_a_relative_brace_pattern_is_kept_under_its_shards_absolute_paths(samples, tmp_path, monkeypatch):
    """Else two folders' shards of one relative name, loaded from two working folders, would share an index."""
    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "index"))
    folder = write_shards(tmp_path / "d", samples)
    monkeypatch.chdir(tmp_path)
    read = count_header_reads(monkeypatch)
    for _ in range(2):
        assert_index_is(load_dataset("wds:d/{train-{000..002},val-000}.tar"), Path("d"), shard_contents(samples))
    cache = wds._IndexCache(tmp_path / "index")
    assert len(read) == 4 and all(cache._file(str(folder / name)).is_file() for name in shard_contents(samples))


def test_an_unwritable_cache_folder_costs_only_the_speed(samples, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file where the cache folder would be")
    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "taken" / "index"))
    folder = write_shards(tmp_path / "d", samples)
    read = count_header_reads(monkeypatch)
    for _ in range(2):
        assert_index_is(load_dataset(f"wds:{folder}"), folder, shard_contents(samples))
    assert len(read) == 8  # every load from the headers, without a word


def test_a_file_system_that_gives_no_tag_is_indexed_every_load(samples, tmp_path, monkeypatch):
    """Without an ETag or mtime in info(), a same-size rewrite could not be told apart: nothing is kept."""
    from fsspec.implementations.local import LocalFileSystem

    monkeypatch.setenv(wds.INDEX_CACHE_ENV, str(tmp_path / "index"))
    real = LocalFileSystem.info
    monkeypatch.setattr(LocalFileSystem, "info", lambda self, path, **kw: {
        k: v for k, v in real(self, path, **kw).items() if k not in ("mtime", "created")})  # fmt: skip
    folder = write_shards(tmp_path / "d", samples)
    read = count_header_reads(monkeypatch)
    for _ in range(2):
        assert_index_is(load_dataset(f"wds:{folder}"), folder, shard_contents(samples))
    assert len(read) == 8 and not (tmp_path / "index").exists()


def test_the_index_cache_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(wds.INDEX_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert wds.index_cache_folder() == tmp_path / "meal-cache" / "wds-index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert wds.index_cache_folder() == Path.home() / ".cache" / "meal-cache" / "wds-index"


# ---------------------------------------------------------------------------------------------- bad shards


def _bad_locations(root: Path, samples) -> list[tuple[str, str, str]]:
    """(case, LOCATION, what the one line says), each LOCATION made here."""
    good = write_shards(root / "good", samples)
    cases = []

    def copy(name: str) -> Path:
        folder = root / name
        folder.mkdir()
        for path in good.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        return folder

    folder = copy("nottar")
    (folder / "train-001.tar").write_bytes(b"not a tar file at all, only text" * 40)
    cases.append(("a shard that is not a tar", str(folder), "train-001.tar' is not a readable tar file"))
    folder = copy("truncated")
    shard = folder / "train-001.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])  # inside the last member's data
    cases.append(("a truncated shard", str(folder), "train-001.tar' is truncated or damaged (unexpected end of data"))
    for case, dropped, said in (("a sample without an image", "jpg", "has no image"),
                                ("a sample without a label", "cls", "has no label")):  # fmt: skip
        folder = write_shards(root / dropped, samples)
        import webdataset

        key, label, suffix, data = samples[0]
        with webdataset.TarWriter(str(folder / "train-000.tar")) as sink:
            sink.write({"__key__": key, **({"jpg": data} if dropped == "cls" else {"cls": str(label)})})
        cases.append((case, str(folder), f"sample '{key}' of wds shard '{folder / 'train-000.tar'}' {said}"))
    corrupt = list(samples)
    key, label, _, data = corrupt[2]
    corrupt[2] = (key, label, "jpg", data[:40])
    folder = write_shards(root / "corrupt", corrupt)
    cases.append(("a corrupt image in a shard", str(folder), f"image '{folder}/train-000.tar/{key}.jpg' is not a "
                  "readable image"))  # fmt: skip
    folder = copy("noval")
    for path in folder.glob("val-*.tar"):
        path.unlink()
    cases.append(("a split without shards", str(folder), "has no test shards: it needs val-*.tar"))
    cases.append(("a missing location", str(root / "nowhere"), "folder does not exist"))
    cases.append(("a brace pattern naming a missing shard", f"{good}/train-{{000..009}}.tar", "does not exist"))
    return cases


def test_bad_shards_give_one_line_naming_the_shard_and_exit_2(samples, tmp_path):
    """The first case through the console script, the others through click in this process (the same command and
    its one line, without an interpreter start each)."""
    cases = _bad_locations(tmp_path, samples)
    for number, (case, location, said) in enumerate(cases):
        args = ["train", "--arch", "resnet8_w4", "--data", f"wds:{location}", "--image-size", "16", "--epochs", "1",
                "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "t.pt")]  # fmt: skip
        line = one_error_line(run_console(args, tmp_path)) if number == 0 else one_error_line_in_process(args)
        assert said in line, case


def test_an_image_that_does_not_decode_is_named_by_shard_and_key(samples, tmp_path):
    """In process, the header scan's refusal and the worker's (the console test above sees the first)."""
    corrupt = list(samples)
    key, label, _, data = corrupt[2]
    corrupt[2] = (key, label, "jpg", data[:40])
    dataset = load_dataset(f"wds:{write_shards(tmp_path, corrupt)}")
    with pytest.raises(UserError, match=f"train-000.tar/{key}.jpg' is not a readable image"):
        dataset.train.source_sizes(0)
    # Sizes known (as a store records them), the worker's decode is what refuses it.
    dataset.train.known_sizes = load_dataset(f"wds:{write_shards(tmp_path / 'good', samples)}").train.source_sizes(0)
    with pytest.raises(UserError, match=f"train-000.tar/{key}.jpg' cannot be decoded .*replace that sample"):
        pixels_of(dataset.train, dataset.train.eval_view(0))
