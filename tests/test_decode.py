"""GPU decoding of streamed image folders (--decode, issue 32): the workers read bytes, one batched decode_jpeg
decodes a request's JPEGs, render_decoded crops and resizes each row as the CPU workers do. At the end, the CPU
decoder (meal_cache/data/decode.py, issue 42): TorchCodec's pixels held to torchvision.io's, bit for bit.

On the CPU the bytes path runs with ``decode_jpeg(..., device="cpu")``: the same libjpeg and the same resize as
the CPU workers, so its pixels must be the workers' bit for bit (tolerance 0). On a GPU (the ``cuda`` tests,
skipped here) nvjpeg replaces libjpeg and the resize runs in CUDA's float path, so the pixels may differ:

- pixels: mean |GPU - CPU| <= 1.5 levels and 99 % of values within 8 levels (nvjpeg's IDCT and chroma upsampling
  differ from libjpeg's by a level or two over smooth areas, more along sharp edges); a wrong box, flip, channel
  order or size differs by tens of levels over most of the image;
- a store extracted with --decode cuda against one with --decode cpu (both on the GPU, fp16): every float array
  within test_cuda's fp16 tolerance, 1 % of its largest value. Neither is measured yet: no GPU was lent when
  they were written (docs/scaling.md §6).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from console import one_error_line, run_console
from imagefolder import make_image_folder, write_image
from torchvision.transforms.v2 import functional as TF

from meal_cache.data.datasets import load_dataset
from meal_cache.data.source import FileSource, decode_device, render_decoded, replay_decode
from meal_cache.errors import UserError
from meal_cache.views import augment

CPU = torch.device("cpu")
SIZE = 32
PIXEL_MEAN_LEVELS = 1.5  # GPU against CPU decoding (see the docstring)
PIXEL_P99_LEVELS = 8.0
STORE_TOLERANCE = 0.01  # test_cuda.py's ARRAY_TOLERANCE["fp16"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("jpegs"), classes=4, train=5, val=2)


def _request(split, seed: int = 1, vflip: bool = True):
    """Rows in any order, one of them three times (K crops of one image), with boxes, flips and vertical flips."""
    sizes = split.source_sizes(0)
    recipe = dataclasses.replace(augment.RECIPES["full"], vflip=0.5 if vflip else 0.0)
    params = augment.draw(recipe, sizes, augment.view_generator(seed, 0))
    rows = torch.tensor([3, 0, 7, 7, 7, 12, 19, 5])
    return rows, params[rows]


def _pixels(source, rows, params) -> torch.Tensor:
    try:
        return torch.cat([pixels for _, pixels in source.pixels([(rows[:4], params[:4], "a"),
                                                                  (rows[4:], params[4:], "b")])])  # fmt: skip
    finally:
        source.close()


def test_render_decoded_crops_resizes_and_mirrors_each_row_as_torchvision_does():
    images = [torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8), torch.randint(0, 256, (3, 90, 40),
                                                                                  dtype=torch.uint8)]  # fmt: skip
    crops = torch.tensor([[5, 10, 40, 50], [0, 0, 90, 40], [20, 3, 30, 30]], dtype=torch.int16)
    flips, vflips = torch.tensor([True, False, False]), torch.tensor([False, False, True])
    rows = [images[0], images[1], images[0]]
    got = render_decoded(rows, crops, flips, vflips, 24)
    for index, (image, (y0, x0, h, w)) in enumerate(zip(rows, crops.tolist(), strict=True)):
        expected = TF.resize(image[:, y0 : y0 + h, x0 : x0 + w], [24, 24], antialias=True)
        expected = expected.flip(-1) if flips[index] else expected
        expected = expected.flip(-2) if vflips[index] else expected
        assert torch.equal(got[index], expected), index


@pytest.mark.parametrize("workers", [0, 2])
def test_the_bytes_path_decoded_here_gives_the_cpu_workers_pixels_exactly(folder, workers):
    split = load_dataset(f"imagefolder:{folder}", image_size=SIZE).train
    rows, params = _request(split)
    assert params.vflip is not None and params.vflip.any() and params.flip.any()
    on_workers = _pixels(split.open(CPU, workers, decode="cpu"), rows, params)
    from_bytes = _pixels(FileSource(split, CPU, workers, SIZE, jpeg_device=CPU), rows, params)
    assert torch.equal(from_bytes, on_workers)  # same libjpeg, same resize: tolerance 0


def test_k_crops_of_one_image_are_read_and_decoded_once_and_jpegs_in_one_batched_call(folder, monkeypatch):
    split = load_dataset(f"imagefolder:{folder}", image_size=SIZE).train
    rows, params = _request(split)
    reads, batches = [], []
    real_read, real_decode = torchvision.io.read_file, torchvision.io.decode_jpeg

    def counting_read(path):
        reads.append(path)
        return real_read(path)

    def counting_decode(datas, **kwargs):
        batches.append(len(datas) if isinstance(datas, list) else 1)
        return real_decode(datas, **kwargs)

    monkeypatch.setattr(torchvision.io, "read_file", counting_read)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting_decode)
    _pixels(FileSource(split, CPU, 0, SIZE, jpeg_device=CPU), rows, params)
    # Requests [3, 0, 7, 7] and [7, 12, 19, 5]: row 7's three crops come from one read in each request.
    assert len(reads) == 3 + 4 and batches == [3, 4]


def test_auto_decodes_on_the_gpu_only_a_folder_of_jpegs_on_a_gpu_and_cuda_needs_one(folder, monkeypatch):
    gpu = torch.device("cuda")  # only compared, never used: no GPU is needed
    jpegs = np.array([b"a/0.jpg", b"b/1.JPEG", b"c/2.jpeg"])
    assert decode_device("auto", gpu, jpegs) == gpu
    assert decode_device("auto", gpu, np.append(jpegs, b"d/3.png")) is None  # a folder with a PNG stays on the CPU
    assert decode_device("auto", CPU, jpegs) is None and decode_device("cpu", gpu, jpegs) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--decode cuda was asked for, but no CUDA GPU is available"):
        decode_device("cuda", gpu, jpegs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decode_device("cuda", gpu, np.append(jpegs, b"d/3.png")) == gpu
    with pytest.raises(UserError, match="its device is cpu"):
        decode_device("cuda", CPU, jpegs)
    with pytest.raises(UserError, match="--decode must be one of auto, cpu, cuda"):
        decode_device("gpu", gpu, jpegs)


def test_files_that_are_not_jpegs_are_decoded_by_the_workers_in_a_gpu_batch(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "mixed", classes=2, train=3, val=1)
    rng = np.random.default_rng(3)
    write_image(root / "train" / "c00" / "p.png", 120, 90, np.array([20.0, 200.0, 90.0]), rng)
    # A PNG named .jpg: the bytes, not the name, say which decoder takes it.
    write_image(root / "train" / "c01" / "q.png", 100, 140, np.array([200.0, 20.0, 90.0]), rng)
    (root / "train" / "c01" / "q.png").rename(root / "train" / "c01" / "q.jpg")
    split = load_dataset(f"imagefolder:{root}", image_size=SIZE).train
    names = [name.decode() for name in split.files]
    png, misnamed = names.index("train/c00/p.png"), names.index("train/c01/q.jpg")
    rows = torch.tensor([png, 0, misnamed, png, names.index("train/c01/1.jpg")])
    params = augment.draw(augment.RECIPES["full"], split.source_sizes(0), augment.view_generator(2, 0))[rows]
    batches = []
    real_decode = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg",
                        lambda datas, **kw: batches.append(len(datas)) or real_decode(datas, **kw))  # fmt: skip
    source = FileSource(split, CPU, 0, SIZE, jpeg_device=CPU)
    ((_, from_bytes),) = source.pixels([(rows, params, None)])
    ((_, on_workers),) = split.open(CPU, 0, decode="cpu").pixels([(rows, params, None)])
    assert torch.equal(from_bytes, on_workers) and batches == [2]  # the two real JPEGs only


def _error(split, source_of) -> str:
    rows = torch.arange(len(split))
    with pytest.raises(UserError) as raised:
        list(source_of(split).pixels([(rows, split.eval_view(0), None)]))
    return str(raised.value)


def test_bad_files_give_the_same_one_line_error_naming_the_file(tmp_path):
    root = make_image_folder(tmp_path / "bad", classes=2, train=3, val=1)
    good = root / "train" / "c01" / "0.jpg"
    on_workers = lambda split: split.open(CPU, 0, decode="cpu")  # noqa: E731
    from_bytes = lambda split: FileSource(split, CPU, 0, SIZE, jpeg_device=CPU)  # noqa: E731
    # A file that changed size since it was recorded.
    split = load_dataset(f"imagefolder:{root}", image_size=SIZE).train
    split.source_sizes(0)
    write_image(good, 151, 152, np.array([1.0, 2.0, 3.0]), np.random.default_rng(5))
    message = _error(split, from_bytes)
    assert "c01/0.jpg' is 152x151 px, not the" in message and message == _error(split, on_workers)
    # A truncated JPEG (its header reads, its pixels do not).
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    split = load_dataset(f"imagefolder:{root}", image_size=SIZE).train
    message = _error(split, from_bytes)
    assert "c01/0.jpg' cannot be decoded" in message and "\n" not in message
    assert message == _error(split, on_workers)


def test_decode_is_not_recorded_in_store_settings_checkpoints_run_configs_or_stamps():
    from meal_cache.distill import DistillConfig
    from meal_cache.distill.built_run import config_json
    from meal_cache.engine.train import TrainConfig
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import _settings
    from meal_cache.pipeline.run import _stamped

    data = SimpleNamespace(fingerprint=lambda split: "f")
    extract = [ExtractConfig(teachers=["t"], decode=decode) for decode in ("auto", "cpu", "cuda")]
    assert all(_settings(config, data, []) == _settings(extract[0], data, []) for config in extract)
    assert all("decode" not in _stamped(config) for config in extract)
    assert TrainConfig("resnet8_w4", decode="cpu").recorded() == TrainConfig("resnet8_w4").recorded()
    assert "decode" not in TrainConfig("resnet8_w4").recorded()
    assert "decode" not in _stamped(TrainConfig("resnet8_w4", decode="cpu"))
    distill = DistillConfig(store="s.zarr", student="resnet8_w4")
    assert config_json(dataclasses.replace(distill, decode="cpu")) == config_json(distill)
    assert "decode" not in config_json(distill)


@pytest.mark.parametrize("command", ["extract --teachers resnet8_w4 --out {out}/s.zarr",
                                     "distill --store {out} --student resnet8_w4 --out {out}/run",  # a store path there
                                     "train --arch resnet8_w4 --out {out}/t.pt"])  # fmt: skip
def test_decode_cuda_without_a_gpu_is_one_error_line(tmp_path, command):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = command.format(out=tmp_path).split() + ["--decode", "cuda", "--device", "cpu"]
    line = one_error_line(run_console(args, tmp_path))
    assert line == "Error: --decode cuda was asked for, but no CUDA GPU is available (use --decode cpu or auto)"
    assert not any(tmp_path.glob("s.zarr")) and not any(tmp_path.glob("run"))


# ------------------------------------------------------------------------------------------------ on a GPU

GPU = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decoded_pixels_match_the_cpu_ones_within_a_few_levels(folder, workers):
    split = load_dataset(f"imagefolder:{folder}", image_size=SIZE).train
    rows, params = _request(split)
    on_cpu = _pixels(split.open(CPU, workers, decode="cpu"), rows, params)
    on_gpu = _pixels(split.open(GPU, workers, decode="cuda"), rows, params)
    assert split.open(GPU, 0).jpeg_device == GPU  # auto: a folder of JPEGs on a GPU
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    diff = (on_gpu.cpu() - on_cpu).abs()
    assert float(diff.mean()) <= PIXEL_MEAN_LEVELS, float(diff.mean())
    assert float(diff.flatten().quantile(0.99)) <= PIXEL_P99_LEVELS, float(diff.flatten().quantile(0.99))


@pytest.fixture(scope="module")
def folder_teachers(folder, tmp_path_factory):
    from meal_cache.engine.train import TrainConfig, train_supervised

    teachers = tmp_path_factory.mktemp("decode-teachers")
    for arch in ("resnet8_w4", "densenet_k12"):
        config = TrainConfig(arch=arch, data=f"imagefolder:{folder}", image_size=SIZE, epochs=1, batch_size=8,
                             device="cpu", workers=0)  # fmt: skip
        train_supervised(config, teachers / f"{arch}.pt", progress=False)
    return teachers


@pytest.mark.cuda
def test_a_store_extracted_with_gpu_decoding_replays_its_pixels_and_matches_cpu_decoding(
    folder, folder_teachers, tmp_path, monkeypatch
):
    import zarr
    from by_hand import record_teacher_pixels, store_arrays
    from extract_order import fed_per_view

    from meal_cache import distill as distill_module
    from meal_cache.distill import DistillConfig, distill
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract
    from meal_cache.runtime import AMP_ENV

    spec = f"imagefolder:{folder}"
    base = ExtractConfig(teachers=["resnet8_w4", "densenet_k12"], data=spec, image_size=SIZE, views=2,
                         teacher_dir=str(folder_teachers), rows_per_chunk=8, batch_size=4, device="cuda",
                         workers=0)  # fmt: skip
    stores = {}
    for decode in ("cpu", "cuda"):
        monkeypatch.setenv(AMP_ENV, "fp16")
        fed = record_teacher_pixels(monkeypatch, "resnet8_w4")
        store = extract(dataclasses.replace(base, decode=decode), tmp_path / f"{decode}.zarr", progress=False)
        monkeypatch.undo()
        stores[decode] = (store, fed_per_view(fed, store.n, store.num_views, base.rows_per_chunk, base.batch_size))
    on_cpu = store_arrays(zarr.open_group(str(tmp_path / "cpu.zarr"), mode="r"))
    on_gpu = store_arrays(zarr.open_group(str(tmp_path / "cuda.zarr"), mode="r"))
    assert on_cpu.keys() == on_gpu.keys()
    for key, reference in on_cpu.items():
        if not np.issubdtype(reference.dtype, np.floating):  # labels, boxes, flips: the same views
            np.testing.assert_array_equal(on_gpu[key], reference, err_msg=key)
            continue
        reference, got = reference.astype(np.float32), on_gpu[key].astype(np.float32)
        error = np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-6)
        assert error <= STORE_TOLERANCE, f"{key}: {error:.4f} of its scale"
    # Replay: a distill step's pixels, decoded on the GPU again, are the very pixels the teachers were fed.
    store, fed = stores["cuda"]
    seen = []
    real_step = distill_module.DistillEpochs.step

    def record(self, batch):
        (rows, _, _), pixels = batch
        seen.append((rows.clone(), pixels.clone()))
        return real_step(self, batch)

    monkeypatch.setattr(distill_module.DistillEpochs, "step", record)
    config = DistillConfig(
        store=str(tmp_path / "cuda.zarr"),
        student="resnet8_w4",
        method="kd",
        epochs=2,
        batch_size=8,
        device="cuda",
        workers=0,
    )  # fmt: skip (auto: the store's own decoder)
    distill(config, tmp_path / "run", progress=False)
    per_epoch = store.n // 8
    assert len(seen) == 2 * per_epoch
    for index, (rows, pixels) in enumerate(seen):
        assert torch.equal(pixels, fed[index // per_epoch][rows.to(fed.device)]), index


def test_a_store_records_its_decoder_and_a_replay_decodes_as_it_did(folder, tmp_path):
    from meal_cache.engine.train import TrainConfig, train_supervised
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract

    spec = f"imagefolder:{folder}"
    train_supervised(TrainConfig(arch="resnet8_w4", data=spec, image_size=SIZE, epochs=1, device="cpu", workers=0),
                     tmp_path / "t" / "resnet8_w4.pt", progress=False)  # fmt: skip
    store = extract(ExtractConfig(teachers=["resnet8_w4"], data=spec, image_size=SIZE, views=1, device="cpu",
                                  teacher_dir=str(tmp_path / "t"), workers=0), tmp_path / "s.zarr",
                    progress=False)  # fmt: skip
    assert store.dataset["decode"] == "cpu"  # auto on a CPU
    # auto replays with the store's decoder: a GPU-decoded store on a GPU, anything else (older stores too) on the
    # CPU workers; an explicit choice stands.
    assert [replay_decode("auto", recorded) for recorded in ("cpu", None, "cuda")] == ["cpu", "cpu", "auto"]
    assert replay_decode("cuda", "cpu") == "cuda" and replay_decode("cpu", "cuda") == "cpu"


# ------------------------------------------------------------------------- every view of a row from one decode


def test_extract_decodes_each_image_once_for_all_its_views(folder, tmp_path, monkeypatch):
    from meal_cache.data import source as source_module
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract
    from meal_cache.nets.checkpoint import model_payload, save_checkpoint
    from meal_cache.nets.models import create_model

    spec = f"imagefolder:{folder}"
    dataset = load_dataset(spec, image_size=SIZE)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "resnet8_w4.pt", model_payload(create_model("resnet8_w4", dataset.num_classes, SIZE),
                                                              "resnet8_w4", dataset, {}, 0, [], {}))  # fmt: skip
    decoded = []
    real_decode = source_module.decode_rgb
    monkeypatch.setattr(source_module, "decode_rgb", lambda path: decoded.append(path) or real_decode(path))
    config = ExtractConfig(teachers=["resnet8_w4"], data=spec, image_size=SIZE, views=3, identity_view=True,
                           preset="kd", teacher_dir=str(tmp_path), rows_per_chunk=8, batch_size=5, device="cpu",
                           workers=0, decode="cpu")  # fmt: skip
    store = extract(config, tmp_path / "s.zarr", progress=False, dataset=dataset)
    assert store.complete and store.num_views == 4
    # Chunks of 8 rows in mini-batches of 5: every row is decoded once, for its 4 views, not once a view.
    split = dataset.train
    assert sorted(decoded) == sorted(f"{split.root}/{name.decode()}" for name in split.files)


def test_the_bytes_path_reads_each_file_once_for_all_the_views_of_a_request(folder, monkeypatch):
    """The --decode cuda path run here (decode_jpeg on the CPU): several views of some rows in one request read
    each file once and decode the request's JPEGs in one batched call, with each view's pixels as a request of
    that view alone gives them."""
    from meal_cache.data.source import views_pixels

    split = load_dataset(f"imagefolder:{folder}", image_size=SIZE).train
    sizes = split.source_sizes(0)
    views = [augment.draw(augment.RECIPES["full"], sizes, augment.view_generator(seed, 0)) for seed in (1, 2, 3)]
    rows = torch.tensor([3, 0, 7, 12])
    alone = [_pixels(FileSource(split, CPU, 0, SIZE, jpeg_device=CPU), rows, view[rows]) for view in views]
    reads, batches = [], []
    real_read, real_decode = torchvision.io.read_file, torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "read_file", lambda path: reads.append(path) or real_read(path))
    monkeypatch.setattr(torchvision.io, "decode_jpeg",
                        lambda datas, **kw: batches.append(len(datas)) or real_decode(datas, **kw))  # fmt: skip
    source = FileSource(split, CPU, 0, SIZE, jpeg_device=CPU)
    ((payload, together),) = views_pixels(source, [(rows, [view[rows] for view in views], "p")])
    source.close()
    assert payload == "p" and len(reads) == 4 and batches == [4]
    assert len(together) == 3 and all(torch.equal(got, want) for got, want in zip(together, alone, strict=True))


# ------------------------------------------------------ CPU decoding: TorchCodec, torchvision.io as the fallback

# Every colour mode a folder of photographs or scans holds, in the formats both decoders read.
MODES = [("L", ".jpg"), ("CMYK", ".jpg"), ("RGB", ".jpg"), ("L", ".png"), ("LA", ".png"), ("P", ".png"),
         ("RGBA", ".png"), ("RGB", ".png"), ("RGB", ".webp")]  # fmt: skip


def _torchvision_rgb(path) -> torch.Tensor:
    """torchvision.io's own decode, the reference the TorchCodec pixels are held to (another library)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torchvision.io.decode_image(torchvision.io.read_file(str(path)), mode=torchvision.io.ImageReadMode.RGB)


def _without_torchcodec(monkeypatch) -> None:
    from meal_cache.data import decode

    monkeypatch.setattr(decode, "_TORCHCODEC_DECODE", None)


def test_torchcodec_decodes_every_colour_mode_to_torchvisions_rgb_pixels(tmp_path, monkeypatch):
    from meal_cache.data.decode import DECODER, decode_file

    assert DECODER.startswith("torchcodec.decoders.decode_image 0.16")  # pyproject pins it beside torch 2.14
    rng = np.random.default_rng(3)
    paths = []
    for mode, suffix in MODES:
        paths.append(tmp_path / f"{mode}{suffix}")
        write_image(paths[-1], 45, 61, np.array([120.0, 60.0, 200.0]), rng, mode=mode)
    by_torchcodec = [decode_file(str(path)) for path in paths]
    _without_torchcodec(monkeypatch)
    by_fallback = [decode_file(str(path)) for path in paths]
    for path, codec, fallback in zip(paths, by_torchcodec, by_fallback, strict=True):
        reference = _torchvision_rgb(path)
        assert codec.dtype == torch.uint8 and codec.shape == (3, 45, 61), path.name
        assert torch.equal(codec, reference) and torch.equal(fallback, reference), path.name
    grey = by_torchcodec[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # An image's bytes (a shard's member) decode as its file does, by either decoder.
    from meal_cache.data.decode import decode_data

    for path, reference in zip(paths, by_fallback, strict=True):
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        assert torch.equal(decode_data(data), reference), path.name
    monkeypatch.undo()
    for path, reference in zip(paths, by_torchcodec, strict=True):
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        assert torch.equal(decode_data(data), reference), path.name


def test_a_sixteen_bit_png_is_rounded_to_eight_bits_by_both_decoders(tmp_path, monkeypatch):
    from PIL import Image

    from meal_cache.data.decode import decode_file

    values = np.array([[0, 128, 129, 255, 256, 385, 32767, 32768, 40000, 65280, 65407, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = torch.from_numpy(np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)).expand(3, -1, -1)
    by_torchcodec = decode_file(str(tmp_path / "deep.png"))
    _without_torchcodec(monkeypatch)
    by_fallback = decode_file(str(tmp_path / "deep.png"))
    assert by_torchcodec.dtype == by_fallback.dtype == torch.uint8
    assert torch.equal(by_torchcodec, expected) and torch.equal(by_fallback, expected)


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_broken_and_foreign_files_keep_their_errors_without_a_source_location(tmp_path, monkeypatch, decoder):
    from meal_cache.data.source import readable

    if decoder == "torchvision":
        _without_torchcodec(monkeypatch)
    rng = np.random.default_rng(4)
    for name in ("photo.jpg", "scan.png", "old.bmp", "page.tif"):
        write_image(tmp_path / name, 40, 50, np.array([90.0, 140.0, 30.0]), rng)
    for name in ("photo.jpg", "scan.png"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("not an image")
    reasons = {path.name: readable(str(path)) for path in tmp_path.iterdir()}
    # BMP and TIFF: neither decoder reads them, PIL does.
    assert reasons["photo.jpg"] is reasons["scan.png"] is reasons["old.bmp"] is reasons["page.tif"] is None
    assert reasons["cut-photo.jpg"].startswith("Image is incomplete or truncated")
    assert "decode_png" in reasons["cut-scan.png"] and "corrupted" in reasons["cut-scan.png"]
    assert reasons["notes.jpg"].startswith("cannot identify image file")
    assert not any(".cpp" in reason or "/__w/" in reason for reason in reasons.values() if reason), reasons


def test_without_torchcodec_torchvision_decodes_and_is_the_recorded_decoder(tmp_path):
    import subprocess
    import sys

    write_image(tmp_path / "a.jpg", 30, 40, np.array([200.0, 40.0, 40.0]), np.random.default_rng(0))
    code = ("import sys; sys.modules['torchcodec'] = None\n"  # as if it were not installed
            "from meal_cache.data.decode import DECODER, decode_file\n"
            f"print(DECODER); print(tuple(decode_file({str(tmp_path / 'a.jpg')!r}).shape))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == [f"torchvision.io.decode_image {torchvision.__version__}", "(3, 30, 40)"]


def test_a_store_of_torchvision_pixels_records_it_and_distills_with_torchcodec(folder, tmp_path, monkeypatch):
    from meal_cache.data import datasets
    from meal_cache.distill import DistillConfig, distill
    from meal_cache.extract.config import ExtractConfig
    from meal_cache.extract.run import extract
    from meal_cache.nets.checkpoint import model_payload, save_checkpoint
    from meal_cache.nets.models import create_model

    spec = f"imagefolder:{folder}"
    dataset = load_dataset(spec, image_size=SIZE)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "resnet8_w4.pt", model_payload(create_model("resnet8_w4", dataset.num_classes, SIZE),
                                                              "resnet8_w4", dataset, {}, 0, [], {}))  # fmt: skip
    with monkeypatch.context() as patched:  # the store of a machine without TorchCodec
        _without_torchcodec(patched)
        patched.setattr(datasets, "DECODER", f"torchvision.io.decode_image {torchvision.__version__}")
        config = ExtractConfig(teachers=["resnet8_w4"], data=spec, image_size=SIZE, views=1, identity_view=True,
                               preset="kd", teacher_dir=str(tmp_path), rows_per_chunk=8, batch_size=8,
                               device="cpu", workers=0)  # fmt: skip
        store = extract(config, tmp_path / "s.zarr", progress=False)
        rows = torch.arange(store.n)
        view = store.view_params(0)
        fallback = _pixels(dataset.train.open(CPU, 0), rows, view)
    assert store.dataset["decoder"].startswith("torchvision.io.decode_image")
    assert torch.equal(_pixels(dataset.train.open(CPU, 0), rows, view), fallback)  # the teachers' pixels
    run = DistillConfig(store=str(tmp_path / "s.zarr"), student="resnet8_w4", method="kd", epochs=1, batch_size=8,
                        device="cpu", workers=0)  # fmt: skip
    distill(run, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "student.pt").is_file()
