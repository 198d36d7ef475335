"""Stores that grow (issue 41): extract with one more teacher onto a finished store writes only the new teacher's
units, leaves what the store holds untouched, and ends as the store one extract of every teacher writes, array for
array and attribute for attribute; the growth resumes after a kill; anything but added teachers is refused by name."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import zarr
from by_hand import store_arrays
from extract_order import extract_recording_units

import meal_cache.extract.run as extract_module
from meal_cache.errors import UserError
from meal_cache.extract.run import extract
from meal_cache.store import describe_store, open_store
from meal_cache.store.origins import read_origins

TEACHERS = ["resnet8_w4", "densenet_k12"]


def _files(store) -> dict[str, int]:
    """Each chunk file of the store with its modification time."""
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}


def _first_rows(dataset, rows: int):
    """``dataset`` with only its first ``rows`` training rows."""
    from meal_cache.data.datasets import ImageDataset, Split

    train = Split(dataset.train.images[:rows], dataset.train.labels[:rows])
    return ImageDataset(**{**dataset.__dict__, "train": train})


def _assert_same_store(a, b) -> None:
    first, second = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(first.attrs) == dict(second.attrs)
    arrays_a, arrays_b = store_arrays(first), store_arrays(second)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert (arrays_a[key] == arrays_b[key]).all(), key


def test_a_teacher_added_to_a_store_gives_the_store_of_both(small_store, digits, tmp_path, interrupt_on_call):
    together, config = small_store  # both teachers, 2 views and the identity view
    grown = tmp_path / "grown.zarr"
    extract(dataclasses.replace(config, teachers=["resnet8_w4"]), grown, progress=False, dataset=digits)
    before = _files(grown / "teachers" / "resnet8_w4")
    undo = interrupt_on_call(extract_module, "store_arrays", 4)  # killed in the new teacher's 4th unit
    with pytest.raises(KeyboardInterrupt):
        extract(config, grown, progress=False, dataset=digits)
    undo()
    partial = open_store(grown)
    assert not partial.complete and 0 < partial.progress("densenet_k12").sum() < partial.progress("resnet8_w4").sum()
    written = extract_recording_units(config, grown, dataset=digits)
    # Only the new teacher's missing (view, chunk) units ran on resume: 3 views x 6 chunks less the 3 done.
    assert len(written) == 3 * 6 - 3
    assert _files(grown / "teachers" / "resnet8_w4") == before  # the stored teacher's files untouched
    _assert_same_store(together, grown)
    extracts = read_origins(open_store(grown).group)  # the resume recorded no third extract
    assert [(entry["teachers"], entry["views"]) for entry in extracts] == [(["resnet8_w4"], [0, 3]),
                                                                          (["densenet_k12"], None)]  # fmt: skip


def test_only_added_teachers_grow_a_store(small_store, digits, tmp_path):
    _, config = small_store
    target = tmp_path / "s.zarr"
    one = dataclasses.replace(config, teachers=["resnet8_w4"], views=1, identity_view=False)
    extract(one, target, progress=False, dataset=digits)
    with pytest.raises(UserError, match="other settings.*teacher_checkpoints.resnet8_w4.*there, absent now"):
        extract(dataclasses.replace(one, teachers=["densenet_k12"]), target, progress=False, dataset=digits)
    # Teachers and views added grow it (below); with another setting changed besides, it is refused naming it.
    with pytest.raises(UserError, match="other settings.*seed: 0 there, 1 now"):
        extract(dataclasses.replace(one, teachers=config.teachers, views=2, seed=1), target, progress=False,
                dataset=digits)  # fmt: skip
    assert open_store(target).teacher_names == ["resnet8_w4"] and open_store(target).complete


def test_a_store_with_divergent_views_is_not_grown(small_store, digits, teacher_dir, tmp_path):
    """Divergent views are searched for on the teachers' disagreement: another teacher would change them."""
    _, config = small_store
    teachers = tmp_path / "teachers"
    shutil.copytree(teacher_dir, teachers)
    shutil.copy(teachers / "resnet8_w4.pt", teachers / "third.pt")
    two = dataclasses.replace(config, views=1, identity_view=False, divergent_views=1, divergent_steps=1,
                              teacher_dir=str(teachers))  # fmt: skip
    target = tmp_path / "divergent.zarr"
    few = _first_rows(digits, 128)  # the refusal needs a store of divergent views, not a large one
    extract(two, target, progress=False, dataset=few)
    with pytest.raises(UserError, match="holds divergent views, searched for on its teachers' disagreement"):
        extract(dataclasses.replace(two, teachers=[*config.teachers, "third"]), target, progress=False,
                dataset=few)  # fmt: skip
    assert open_store(target).teacher_names == config.teachers


def test_more_views_grow_a_store_of_augmented_views(small_store, digits, tmp_path):
    """A 1-view store asked for 2 views (RandAugment and CutMix drawn, so every kind of view array is grown)
    gains view 1 and equals a 2-view store; its view 0 keeps its files."""
    _, config = small_store
    mixed = dataclasses.replace(config, teachers=["resnet8_w4"], identity_view=False, policy="randaugment",
                                cutmix=1.0)  # fmt: skip
    at_once, grown = tmp_path / "two.zarr", tmp_path / "grown.zarr"
    extract(dataclasses.replace(mixed, views=2), at_once, progress=False, dataset=digits)
    extract(dataclasses.replace(mixed, views=1), grown, progress=False, dataset=digits)
    first_views = {k: v for k, v in _files(grown).items() if "/c/0/" in k}
    extract(dataclasses.replace(mixed, views=2), grown, progress=False, dataset=digits)
    assert {k: v for k, v in _files(grown).items() if k in first_views} == first_views
    _assert_same_store(at_once, grown)
    with_identity = tmp_path / "identity.zarr"
    shutil.copytree(small_store[0], with_identity)
    with pytest.raises(UserError, match="holds an identity, divergent or dense view after its augmented ones"):
        extract(dataclasses.replace(config, views=3), with_identity, progress=False, dataset=digits)


def test_a_distill_run_started_before_the_store_grew_resumes_on_what_it_read(small_store, digits, tmp_path,
                                                                              interrupt_on_call):  # fmt: skip
    """Killed in its second epoch, the store then grown by a teacher, the run resumes on the first teacher's
    targets alone and ends with the weights of a run on the store before it grew; a new run reads both."""
    from meal_cache.distill import DistillConfig, distill
    from meal_cache.engine import loop as loop_module
    from meal_cache.nets.checkpoint import load_checkpoint

    _, config = small_store
    one = dataclasses.replace(config, teachers=["resnet8_w4"], views=1, identity_view=False)
    before, grown = tmp_path / "before.zarr", tmp_path / "grown.zarr"
    extract(one, before, progress=False, dataset=digits)
    shutil.copytree(before, grown)

    def distilled(store):
        return DistillConfig(store=str(store), student="resnet8_w4", method="kd", epochs=2, batch_size=128,
                             device="cpu", workers=0)  # fmt: skip

    distill(distilled(before), tmp_path / "whole", progress=False, dataset=digits)
    undo = interrupt_on_call(loop_module, "evaluate", 2)  # in the second epoch
    with pytest.raises(KeyboardInterrupt):
        distill(distilled(grown), tmp_path / "run", progress=False, dataset=digits)
    undo()
    extract(dataclasses.replace(one, teachers=config.teachers), grown, progress=False, dataset=digits)
    assert open_store(grown).teacher_names == config.teachers
    distill(distilled(grown), tmp_path / "run", resume=True, progress=False, dataset=digits)
    whole, resumed = (load_checkpoint(tmp_path / run / "student.pt")["model"] for run in ("whole", "run"))
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    recorded = load_checkpoint(tmp_path / "run" / "last.pt")["store_settings"]["teacher_checkpoints"]
    assert list(recorded) == ["resnet8_w4"]  # the resumed run read, and records, the store as it began on it
    distill(distilled(grown), tmp_path / "fresh", progress=False, dataset=digits)
    assert list(load_checkpoint(tmp_path / "fresh" / "last.pt")["store_settings"]["teacher_checkpoints"]) == TEACHERS


def _origins_shown(store) -> list[str]:
    """info's origins lines (through the command, in process): one an extract that added teachers or views."""
    from click.testing import CliRunner

    from meal_cache.cli import main

    shown = CliRunner().invoke(main, ["info", str(store)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("origins"))
    return [line[10:] for line in lines[first:] if line.startswith(("origins ", " " * 10 + "extract "))]


def test_info_names_the_extract_that_added_each_teacher_and_view(small_store, digits, tmp_path):
    """Grown by a teacher, then by a view: three origins in order, each teacher and view range with its own;
    the store extracted at once: one. The root attributes and arrays stay those of the store extracted at once."""
    _, config = small_store
    few = _first_rows(digits, 256)  # one chunk of rows: the record, not the extract, is under test
    one = dataclasses.replace(config, teachers=["resnet8_w4"], views=1, identity_view=False)
    both = dataclasses.replace(one, teachers=TEACHERS)
    at_once, grown = tmp_path / "at_once.zarr", tmp_path / "grown.zarr"
    extract(dataclasses.replace(both, views=2), at_once, progress=False, dataset=few)
    for step in (one, both, dataclasses.replace(both, views=2)):
        extract(step, grown, progress=False, dataset=few)
    _assert_same_store(at_once, grown)  # root attributes and arrays: the origins group holds no array

    added = [(entry["extract"], entry["teachers"], entry["views"]) for entry in read_origins(open_store(grown).group)]
    assert added == [(1, ["resnet8_w4"], [0, 1]), (2, ["densenet_k12"], None), (3, [], [1, 2])]
    shown = _origins_shown(grown)
    assert [line.split(",")[0] for line in shown] == [f"extract {n} ({line[11:27]} UTC)" for n, line in
                                                       zip((1, 2, 3), shown, strict=True)]  # fmt: skip
    assert [line.split(": ", 1)[1] for line in shown] == ["teacher resnet8_w4; view 0", "teacher densenet_k12",
                                                          "view 1"]  # fmt: skip
    described = describe_store(open_store(grown))
    teachers = [line for line in described.splitlines() if line.startswith("teacher ")]
    assert [line.split()[1] + " " + line.split("added by ")[1][:11] for line in teachers] == [
        "resnet8_w4 extract 1 (", "densenet_k12 extract 2 ("]  # fmt: skip
    views = described.splitlines()[3]
    assert views.startswith("          view 0 added by extract 1 (") and "; view 1 added by extract 3 (" in views
    assert [line.split(": ", 1)[1] for line in _origins_shown(at_once)] == [
        "teachers resnet8_w4, densenet_k12; views 0-1"
    ]
    assert "added by" not in describe_store(open_store(at_once))  # one extract: said once, on the origins line
    # A store made before meal-cache kept the record (no shim): said so, and a growth does not start one.
    shutil.rmtree(grown / "origins")
    extract(dataclasses.replace(both, views=3), grown, progress=False, dataset=few)
    assert _origins_shown(grown) == ["not recorded (a store extracted before meal-cache kept its origins)"]
    assert "added by" not in describe_store(open_store(grown))


def test_a_growth_killed_before_its_origin_is_recorded_is_recorded_by_the_resume(small_store, digits, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    """Killed after the store recorded the added teacher's settings and before its origin: the extract that
    resumes it records it (once), and a finished store's rerun adds nothing."""
    import meal_cache.extract.target as target_module

    _, config = small_store
    few = _first_rows(digits, 256)
    one = dataclasses.replace(config, teachers=["resnet8_w4"], views=1, identity_view=False)
    both = dataclasses.replace(one, teachers=TEACHERS)
    grown = tmp_path / "grown.zarr"
    extract(one, grown, progress=False, dataset=few)
    real = target_module.record_origins

    def killed(*args):
        monkeypatch.setattr(target_module, "record_origins", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(target_module, "record_origins", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(both, grown, progress=False, dataset=few)
    assert open_store(grown).teacher_names == TEACHERS and len(read_origins(open_store(grown).group)) == 1
    extract(both, grown, progress=False, dataset=few)
    extract(both, grown, progress=False, dataset=few)
    assert [entry["teachers"] for entry in read_origins(open_store(grown).group)] == [["resnet8_w4"], ["densenet_k12"]]


def test_teachers_and_views_added_at_once_give_the_store_extracted_at_once(small_store, digits, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """One extract with a teacher and a view more grows the store by both (the teacher, then the views), array for
    array the store extracted at once; killed between the two steps, the next extract grows it by the views."""
    import meal_cache.extract.target as target_module

    _, config = small_store
    few = _first_rows(digits, 256)
    one = dataclasses.replace(config, teachers=["resnet8_w4"], views=1, identity_view=False)
    both = dataclasses.replace(one, teachers=TEACHERS, views=2)
    at_once, grown, killed = tmp_path / "at_once.zarr", tmp_path / "grown.zarr", tmp_path / "killed.zarr"
    extract(both, at_once, progress=False, dataset=few)
    for store in (grown, killed):
        extract(one, store, progress=False, dataset=few)
    extract(both, grown, progress=False, dataset=few)
    _assert_same_store(at_once, grown)
    added = [(entry["teachers"], entry["views"]) for entry in read_origins(open_store(grown).group)]
    assert added == [(["resnet8_w4"], [0, 1]), (["densenet_k12"], None), ([], [1, 2])]

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(target_module, "_grown_by_views", stopped)
    with pytest.raises(KeyboardInterrupt):
        extract(both, killed, progress=False, dataset=few)
    assert open_store(killed).teacher_names == TEACHERS and open_store(killed).num_views == 1
    monkeypatch.undo()
    extract(both, killed, progress=False, dataset=few)
    _assert_same_store(at_once, killed)
