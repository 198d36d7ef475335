"""Stores in a real S3 bucket (issue 31): moto's S3 server on a free local port stands in for AWS, and every
command runs as the real console script with the environment a user of such a server sets (AWS_ENDPOINT_URL and
the AWS_* keys), never with a ~/.aws of this machine's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from by_hand import store_arrays
from console import console_environment, console_script, one_error_line, one_error_line_in_process, run_console

from meal_cache.data.datasets import load_dataset
from meal_cache.extract.config import ExtractConfig
from meal_cache.extract.run import extract

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")

BUCKET = "meal-cache-test"
TEACHER = "resnet8_w4"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _free_port() -> int:
    """A port nothing listens on now (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_it_answers(endpoint: str, server: subprocess.Popen, seconds: float = 60) -> None:
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the test's own proxies never apply
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"moto's server ended with status {server.returncode}"
        try:
            no_proxy.open(endpoint, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"moto's server did not answer at {endpoint} within {seconds} s")


@pytest.fixture(autouse=True)
def _no_aws_settings_of_this_machine(monkeypatch):
    """Whatever AWS_* this machine's environment holds (keys, a profile, an endpoint) would change what a command
    finds; each test passes its own."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto's S3 server on a free 127.0.0.1 port, holding the empty bucket BUCKET, stopped after the module; yields
    the environment of a user of it."""
    port = _free_port()
    script = Path(sys.executable).with_name("moto_server")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "moto.server"]
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    server = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    nowhere = tmp_path_factory.mktemp("no-aws-config")
    endpoint = f"http://127.0.0.1:{port}"
    environment = {
        "AWS_ENDPOINT_URL": endpoint,
        **KEYS,
        "AWS_DEFAULT_REGION": "us-east-1",
        # No ~/.aws: files that do not exist; no instance metadata (on a cloud machine it could hold keys).
        "AWS_CONFIG_FILE": str(nowhere / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(nowhere / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        # run_console points every proxy at a closed port; the local server is reached directly.
        "no_proxy": "127.0.0.1",
        "NO_PROXY": "127.0.0.1",
    }
    try:
        _wait_until_it_answers(endpoint, server)
        import boto3  # s3fs's mkdir sends us-east-1 as a location constraint, which S3 refuses

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)  # fmt: skip
        yield environment
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _bucket(environment: dict[str, str]):
    """The test's own s3fs view of the server: no caches, so each listing is the server's of now."""
    import s3fs

    return s3fs.S3FileSystem(key=KEYS["AWS_ACCESS_KEY_ID"], secret=KEYS["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=environment["AWS_ENDPOINT_URL"], skip_instance_cache=True,
                             use_listings_cache=False, client_kwargs={"region_name": "us-east-1"})  # fmt: skip


def _open_group(environment: dict[str, str], url: str) -> zarr.Group:
    options = {"key": KEYS["AWS_ACCESS_KEY_ID"], "secret": KEYS["AWS_SECRET_ACCESS_KEY"],
               "endpoint_url": environment["AWS_ENDPOINT_URL"],
               "client_kwargs": {"region_name": "us-east-1"}}  # fmt: skip
    return zarr.open_group(url, mode="r", storage_options=options)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, digits) -> Path:
    """The teacher folder: one resnet8_w4 trained one epoch (what it predicts does not matter here)."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    folder = tmp_path_factory.mktemp("s3-teacher")
    config = TrainConfig(arch=TEACHER, data="digits", epochs=1, seed=0, device="cpu")
    train_supervised(config, folder / f"{TEACHER}.pt", progress=False, dataset=digits)
    return folder


def _extract_args(teacher_dir: Path, rows: int, views: int = 2) -> list[str]:
    return ["extract", "--teachers", TEACHER, "--teacher-dir", str(teacher_dir), "--views", str(views),
            "--rows-per-chunk", str(rows), "--batch-size", str(min(rows, 128)), "--device", "cpu",
            "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def bucket_store(s3, tiny_teacher, tmp_path_factory) -> str:
    """A complete store extracted by the console script into the bucket: logits only (--for kd), 2 views of 6
    chunks (the killed extract below writes every kind of array)."""
    url = f"s3://{BUCKET}/feats.zarr"
    args = [*_extract_args(tiny_teacher, 256), "--for", "kd", "--out", url]
    done = run_console(args, tmp_path_factory.mktemp("home"), **s3)
    assert done.returncode == 0, done.stderr[-3000:]
    return url


def test_a_store_extracted_into_a_bucket_is_verified_described_and_inspected(s3, bucket_store, tmp_path):
    verified = run_console(["verify", bucket_store, "--quiet"], tmp_path, **s3)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert verified.stdout.strip().endswith("0 damaged"), verified.stdout
    # fsspec's own variable for the address works as well as botocore's.
    by_fsspec = {k: v for k, v in s3.items() if k != "AWS_ENDPOINT_URL"}
    by_fsspec["FSSPEC_S3_ENDPOINT_URL"] = s3["AWS_ENDPOINT_URL"]
    described = run_console(["info", bucket_store], tmp_path, **by_fsspec)
    assert described.returncode == 0, described.stderr[-3000:]
    assert "(complete)" in described.stdout and f"teacher {TEACHER}" in described.stdout, described.stdout
    assert f"store     {bucket_store}  (complete)" in described.stdout  # the URL as given, not the store's repr
    inspected = run_console(["inspect", bucket_store], tmp_path, **s3)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    assert f"store {bucket_store}: 1437 rows, 2 views" in inspected.stdout, inspected.stdout


def _progress_marks(filesystem, url: str) -> int:
    """A teacher's chunks marked done in the bucket: a mark is written once its chunk is."""
    return len(filesystem.find(f"{url.removeprefix('s3://')}/teachers/{TEACHER}/progress/c"))


def test_an_extract_into_a_bucket_killed_partway_resumes_and_grows_to_the_same_store(s3, tiny_teacher, tmp_path):
    url = f"s3://{BUCKET}/killed.zarr"
    spec = "digits?train_fraction=0.25"  # 359 rows: 12 chunks of 32
    rows = len(load_dataset(spec).train)
    args = [*_extract_args(tiny_teacher, 32, views=1), "--data", spec, "--out", url]
    process = subprocess.Popen([*console_script(), *args], env=console_environment(tmp_path, **s3),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    filesystem, deadline = _bucket(s3), time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and _progress_marks(filesystem, url) == 0:
        time.sleep(0.05)
    assert process.poll() is None, "the extract ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _progress_marks(filesystem, url)
    assert 0 < killed_at < -(-rows // 32) and not _open_group(s3, url).attrs["complete"]
    # Then grown by a view in the bucket (issue 41), which also resumes the first; the first view's stored chunks
    # keep their bytes (their ETags).
    first_view = {key: filesystem.info(key)["ETag"] for key in filesystem.find(f"{BUCKET}/killed.zarr/teachers")}
    grown = run_console([*_extract_args(tiny_teacher, 32, views=2), "--data", spec, "--out", url], tmp_path, **s3)
    assert grown.returncode == 0, grown.stderr[-3000:]
    # (The arrays' zarr.json and the progress marks change: they grew.)
    chunks = {key: tag for key, tag in first_view.items() if "/c/" in key and "/progress/" not in key}
    assert chunks and all(filesystem.info(key)["ETag"] == tag for key, tag in chunks.items())
    # The same store as an uninterrupted local extract of both views, on one thread as the command runs.
    torch.set_num_threads(1)
    config = ExtractConfig(teachers=[TEACHER], data=spec, views=2, teacher_dir=str(tiny_teacher), rows_per_chunk=32,
                           batch_size=32, device="cpu")  # fmt: skip
    extract(config, tmp_path / "local.zarr", progress=False)
    remote, local = _open_group(s3, url), zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    assert dict(remote.attrs) == dict(local.attrs) and remote.attrs["complete"]
    remote_arrays, local_arrays = store_arrays(remote), store_arrays(local)
    assert remote_arrays.keys() == local_arrays.keys()
    for key, value in local_arrays.items():
        np.testing.assert_array_equal(remote_arrays[key], value, err_msg=key)


def test_verify_finds_a_damaged_chunk_in_the_bucket(s3, bucket_store, tmp_path):
    filesystem = _bucket(s3)
    source, copy = bucket_store.removeprefix("s3://"), f"{BUCKET}/damaged.zarr"
    for key in filesystem.find(source):
        filesystem.pipe(copy + key.removeprefix(source), filesystem.cat(key))
    filesystem.pipe(f"{copy}/teachers/{TEACHER}/logits/c/0/0/0", b"not a zstd frame")
    found = run_console(["verify", f"s3://{copy}", "--quiet"], tmp_path, **s3)
    assert found.returncode == 1, (found.returncode, found.stderr[-3000:])
    assert found.stdout.startswith(f"teachers/{TEACHER}/logits chunk (0, 0, 0): corrupt"), found.stdout
    assert found.stdout.strip().endswith("1 damaged"), found.stdout


def test_distill_reads_its_store_from_the_bucket(s3, bucket_store, tmp_path):
    out = tmp_path / "run"
    trained = run_console(["distill", "--store", bucket_store, "--student", "resnet8_w4", "--method", "kd", "--epochs",
                           "1", "--device", "cpu", "--quiet", "--out", str(out)], tmp_path, **s3)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and (out / "student.pt").is_file()


def _bad_inputs(s3: dict[str, str], teacher_dir: Path) -> dict[str, tuple[list[str], dict[str, str], list[str]]]:
    """Each bad input: the command, its environment, and what its one line must say."""
    closed = f"http://127.0.0.1:{_free_port()}"
    no_keys = {k: v for k, v in s3.items() if k not in KEYS}
    extract_to = [*_extract_args(teacher_dir, 256), "--out"]
    return {
        # botocore retries a refused connection 4 times, backing off up to 15 s in all; one retry says the same.
        "S3 endpoint where nothing answers": (["info", f"s3://{BUCKET}/feats.zarr"], {**s3, "AWS_ENDPOINT_URL": closed,
                                                                   "AWS_MAX_ATTEMPTS": "2"},
                           [f"nothing answers at {closed}", "set AWS_ENDPOINT_URL"]),
        "S3 without credentials": ([*extract_to, f"s3://{BUCKET}/no-keys.zarr"], no_keys,
                                ["no AWS credentials", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"]),
        "S3 bucket that does not exist": ([*extract_to, "s3://no-such-bucket/feats.zarr"], s3,
                           ["S3 bucket 'no-such-bucket'", "does not exist", "aws s3 mb s3://no-such-bucket",
                            "AWS_ENDPOINT_URL"]),
    }  # fmt: skip


BAD_INPUTS = ["S3 endpoint where nothing answers", "S3 without credentials", "S3 bucket that does not exist"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_s3_setting_is_one_line_naming_what_to_set(s3, tiny_teacher, tmp_path, case):
    args, environment, says = _bad_inputs(s3, tiny_teacher)[case]
    before = sorted(_bucket(s3).find(BUCKET))
    line = one_error_line(run_console(args, tmp_path, **environment))
    for words in says:
        assert words in line, line
    assert sorted(_bucket(s3).find(BUCKET)) == before, "a refused command wrote to the bucket"


def test_errors_doc_lists_the_s3_rows():
    text = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    for case in BAD_INPUTS:
        assert f"| {case} |" in text, case


def _assert_the_disk_store_of(data: str, teachers: Path, tmp_path: Path) -> None:
    """``tmp_path/s3.zarr`` (extracted from the bucket's copy of ``data``, one view at 16 px) is the store one
    extract of ``data`` on disk writes: the same fingerprint and every array (written to ``tmp_path/disk.zarr``)."""
    torch.set_num_threads(1)
    config = ExtractConfig(teachers=[TEACHER], data=data, views=1, image_size=16, teacher_dir=str(teachers),
                           device="cpu", workers=0)  # fmt: skip
    extract(config, tmp_path / "disk.zarr", progress=False)
    remote, disk = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("s3.zarr", "disk.zarr"))
    assert remote.attrs["dataset"]["fingerprint"] == disk.attrs["dataset"]["fingerprint"]
    remote_arrays, disk_arrays = store_arrays(remote), store_arrays(disk)
    assert remote_arrays.keys() == disk_arrays.keys()
    for key, value in disk_arrays.items():
        np.testing.assert_array_equal(remote_arrays[key], value, err_msg=key)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from meal_cache.nets.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def _trained_from_bucket_and_disk(bucket: str, disk: str, teachers: Path) -> None:
    """One epoch of the teacher on ``bucket`` (in process, the bucket's environment set) and on ``disk``, the same
    files: the same weights, weight for weight (seeded); the disk one is ``teachers``' teacher."""
    from meal_cache.engine.train import TrainConfig, train_supervised

    for data, out in (
        (bucket, teachers.with_name("from-bucket") / f"{TEACHER}.pt"),
        (disk, teachers / f"{TEACHER}.pt"),
    ):
        train_supervised(TrainConfig(arch=TEACHER, data=data, image_size=16, epochs=1, batch_size=16, device="cpu",
                                     workers=0), out, progress=False)  # fmt: skip
    _assert_same_weights(teachers.with_name("from-bucket") / f"{TEACHER}.pt", teachers / f"{TEACHER}.pt")


def _distilled_alike(tmp_path: Path) -> None:
    """distill (in process) from ``tmp_path/s3.zarr``, whose views replay from the bucket, trains the student of
    ``tmp_path/disk.zarr``, weight for weight."""
    from meal_cache.distill import DistillConfig, distill

    for name in ("s3.zarr", "disk.zarr"):
        config = DistillConfig(store=str(tmp_path / name), student="resnet8_w4", method="kd", epochs=1, batch_size=10,
                               device="cpu", workers=0)  # fmt: skip
        distill(config, tmp_path / f"run-{name}", progress=False)
    _assert_same_weights(tmp_path / "run-s3.zarr" / "student.pt", tmp_path / "run-disk.zarr" / "student.pt")


def test_shards_in_a_bucket_give_the_store_of_the_same_shards_on_disk(s3, tmp_path, monkeypatch):
    """``--data wds:s3://...`` (issue 40): tar shards uploaded with s3fs are listed, indexed (tar headers through
    ranged reads) and read row by row from the bucket by the console script; the store equals one extracted from
    the same shards on disk, array for array, and distill from it (pixels read from the bucket) trains the disk
    store's student weight for weight; train from the bucket's shards trains the disk shards' weights. A bucket that
    is not there is one line, as for stores."""
    from test_wds import digit_samples, write_shards

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    local = write_shards(tmp_path / "shards", digit_samples(count=40), held_out=10)
    filesystem = _bucket(s3)
    for path in local.iterdir():
        filesystem.put_file(str(path), f"{BUCKET}/shards/{path.name}")
    teachers = tmp_path / "teachers"
    _trained_from_bucket_and_disk(f"wds:s3://{BUCKET}/shards", f"wds:{local}", teachers)
    args = ["extract", "--teachers", TEACHER, "--teacher-dir", str(teachers), "--views", "1", "--image-size", "16",
            "--workers", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    from_bucket = run_console([*args, "--data", f"wds:s3://{BUCKET}/shards", "--out", str(tmp_path / "s3.zarr")],
                              tmp_path, **s3)  # fmt: skip
    assert from_bucket.returncode == 0, from_bucket.stderr[-3000:]
    _assert_the_disk_store_of(f"wds:{local}", teachers, tmp_path)
    # One line (the bad-settings table below starts the script for stores' refusals; this one runs in process).
    line = one_error_line_in_process([*args, "--data", "wds:s3://no-such-bucket/shards", "--out",
                                      str(tmp_path / "none.zarr")])  # fmt: skip
    assert "S3 bucket 'no-such-bucket'" in line and "does not exist" in line, line
    _distilled_alike(tmp_path)  # the views replayed from the bucket's shards


def test_parquet_in_a_bucket_gives_the_store_of_the_same_files_on_disk(s3, tmp_path, monkeypatch):
    """``--data hf:s3://...`` (issue 40): hub-style parquet uploaded with s3fs is fetched once into datasets' cache
    by the console script and gives the store (fingerprint and every array) of the same files on disk; train from
    the bucket trains the disk files' weights, and distill from the bucket's store (its views replayed from the
    bucket) the disk store's student. A prefix without parquet files is one line (a missing bucket is the stores'
    and shards' check, tested above)."""
    from test_hf_data import write_parquet
    from test_wds import digit_samples

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    cache = tmp_path / "hf-cache"
    environment = {**s3, "HF_DATASETS_CACHE": str(cache)}
    local = write_parquet(tmp_path / "parquet", digit_samples(count=40))
    filesystem = _bucket(s3)
    for path in (local / "data").iterdir():
        filesystem.put_file(str(path), f"{BUCKET}/parquet/data/{path.name}")
    teachers = tmp_path / "teachers"
    _trained_from_bucket_and_disk(f"hf:s3://{BUCKET}/parquet", f"hf:{local}", teachers)
    args = ["extract", "--teachers", TEACHER, "--teacher-dir", str(teachers), "--views", "1", "--image-size", "16",
            "--workers", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    from_bucket = run_console([*args, "--data", f"hf:s3://{BUCKET}/parquet", "--out", str(tmp_path / "s3.zarr")],
                              tmp_path, **environment)  # fmt: skip
    assert from_bucket.returncode == 0, from_bucket.stderr[-3000:]
    fetched = sorted(cache.glob("meal-cache-object-storage/*/data/*.parquet"))
    assert [p.name for p in fetched] == sorted(p.name for p in (local / "data").iterdir())
    assert all(p.read_bytes() == (local / "data" / p.name).read_bytes() for p in fetched)
    _assert_the_disk_store_of(f"hf:{local}", teachers, tmp_path)
    line = one_error_line_in_process([*args, "--data", f"hf:s3://{BUCKET}/nothing-here", "--out",
                                      str(tmp_path / "none.zarr")])  # fmt: skip
    assert "no parquet files under data/" in line, line
    _distilled_alike(tmp_path)


def test_parquet_in_a_bucket_is_fetched_once_and_again_when_it_changes(s3, tmp_path, monkeypatch):
    import datasets
    from test_hf_data import write_parquet
    from test_wds import digit_samples

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    local = write_parquet(tmp_path / "parquet", digit_samples(count=30))
    filesystem = _bucket(s3)
    for path in (local / "data").iterdir():
        filesystem.put_file(str(path), f"{BUCKET}/once/data/{path.name}")
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "meal-cache-object-storage"
    before = set(cache.glob("*/data/*.parquet"))
    first = load_dataset(f"hf:s3://{BUCKET}/once")
    fetched = {p: p.stat().st_mtime_ns for p in set(cache.glob("*/data/*.parquet")) - before}
    assert len(fetched) == 4 and len(first.train) == 15
    again = load_dataset(f"hf:s3://{BUCKET}/once")
    assert {p: p.stat().st_mtime_ns for p in fetched} == fetched  # nothing fetched again
    assert again.fingerprint("train") == first.fingerprint("train")
    # A file replaced by one of another size: fetched again, and the dataset's fingerprint changes with it.
    changed = write_parquet(tmp_path / "changed", digit_samples(count=30, seed=1))
    name = "train-00000-of-00002.parquet"
    assert (changed / "data" / name).stat().st_size != (local / "data" / name).stat().st_size
    filesystem.put_file(str(changed / "data" / name), f"{BUCKET}/once/data/{name}")
    after = load_dataset(f"hf:s3://{BUCKET}/once")
    assert len(set(cache.glob("*/data/*.parquet")) - before - set(fetched)) == 4
    assert after.fingerprint("train") != first.fingerprint("train")


def test_shards_in_a_bucket_are_indexed_once_and_again_when_one_changes(s3, tmp_path, monkeypatch):
    """The shard index cache in object storage (issue 40): a second load of ``wds:s3://`` shards reads no tar
    headers; one shard uploaded again at the same size with other labels (so only its ETag tells) is indexed
    again, alone, and its new labels are read."""
    from test_wds import count_header_reads, digit_samples, write_shard, write_shards

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MEAL_CACHE_WDS_INDEX", str(tmp_path / "index"))
    samples = digit_samples(count=40)
    local = write_shards(tmp_path / "shards", samples, held_out=10)
    filesystem = _bucket(s3)
    for path in local.iterdir():
        filesystem.put_file(str(path), f"{BUCKET}/indexed/{path.name}")
    data = f"wds:s3://{BUCKET}/indexed"
    read = count_header_reads(monkeypatch)
    first = load_dataset(data)
    assert sorted(read) == sorted(p.name for p in local.glob("*.tar"))
    read.clear()
    assert torch.equal(load_dataset(data).train.labels, first.train.labels) and read == []
    relabelled = [(key, (label + 1) % 3, suffix, image) for key, label, suffix, image in samples[16:30]]
    write_shard(local / "train-001.tar", relabelled)  # train-001 holds samples 16-29: the same bytes but the labels
    assert (local / "train-001.tar").stat().st_size == filesystem.size(f"{BUCKET}/indexed/train-001.tar")
    filesystem.put_file(str(local / "train-001.tar"), f"{BUCKET}/indexed/train-001.tar")
    again = load_dataset(data)
    assert read == ["train-001.tar"]
    expected = [label for _, label, _, _ in samples[:16]] + [label for _, label, _, _ in relabelled]
    assert again.train.labels.tolist() == expected
