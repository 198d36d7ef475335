"""The names of a store's arrays, built and taken apart in one place (the layout is in :mod:`meal_cache.store`).

A teacher's arrays live under ``teachers/NAME/``; below it an array has a *name* relative to the teacher
(``logits``, ``blocks/B``, ``maps/B``, ``attention/B``, ``progress``, ``ranges/KIND/B``, ``logits_ENCODING/PART``
such as ``logits_topk/index``), which is what :func:`meal_cache.nets.teachers.teacher_outputs` returns and
:meth:`~meal_cache.store.teacher_store.TeacherStore.write_rows` takes.
This module imports nothing heavy (no zarr), so reports and plots can name arrays without opening a store.
"""

from __future__ import annotations

TEACHERS = "teachers"
LABELS = "labels"
LOGITS = "logits"
PROGRESS = "progress"
VIEW_CROP = "views/crop"
VIEW_FLIP = "views/flip"
# Present only where the views flip rows vertically (extract --vflip above 0).
VIEW_VFLIP = "views/vflip"
# Present only with a policy; each array's last part is its ViewParams field.
OPS_KEYS = ("views/ops", "views/magnitude")
# Present only with mixing; each array's last part is its ViewParams field.
MIX_KEYS = ("views/mix_partner", "views/mix_lambda", "views/mix_box")
SOURCE_SIZE = "views/source_size"
DIVERGENT_PIXELS = "divergent/pixels"
# A block's stored forms: its pooled output (``blocks``), its signed channel mean (``maps``, MEAL's reference
# representation, AFD's input) and its attention, the channel mean of |A|^p (``attention``, AT's F_sum).
FEATURE_KINDS = ("blocks", "maps", "attention")
# What a store holds without --features or --for (and with --for all).
DEFAULT_FEATURES = ("blocks", "maps")


def teacher_key(teacher: str, name: str) -> str:
    """The array ``name`` (relative to the teacher, e.g. ``logits`` or ``blocks/B``) of ``teacher``."""
    return f"{TEACHERS}/{teacher}/{name}"


def logits_key(teacher: str) -> str:
    """``teachers/NAME/logits``: a teacher's logits (as :meth:`TeacherStore.read` gives them, even when top-k)."""
    return teacher_key(teacher, LOGITS)


def feature_name(kind: str, block: str) -> str:
    """``KIND/B``: a feature array's name relative to its teacher (``kind`` one of :data:`FEATURE_KINDS`)."""
    return f"{kind}/{block}"


def feature_key(teacher: str, kind: str, block: str) -> str:
    """``teachers/NAME/KIND/B``: a teacher's pooled block output (``blocks``), channel-mean map (``maps``) or
    attention map (``attention``)."""
    return teacher_key(teacher, feature_name(kind, block))


def progress_key(teacher: str) -> str:
    """``teachers/NAME/progress``: which (view, chunk) of a teacher's arrays are written."""
    return teacher_key(teacher, PROGRESS)


def is_teacher_key(key: str) -> bool:
    """An array under ``teachers/`` (outputs, their companions and progress), not labels, views or pixels."""
    return key.startswith(f"{TEACHERS}/")


def split_teacher_key(key: str) -> tuple[str, str]:
    """``teachers/NAME/REST`` as ``(NAME, REST)``, the inverse of :func:`teacher_key`."""
    root, teacher, name = key.split("/", 2)
    if root != TEACHERS:
        raise ValueError(f"'{key}' is not a teacher's array")
    return teacher, name


def teacher_of(key: str) -> str:
    """The teacher whose array ``key`` is."""
    return split_teacher_key(key)[0]


def is_logits_key(key: str) -> bool:
    """``teachers/NAME/logits`` (not its top-k parts)."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == TEACHERS and parts[2] == LOGITS


def is_feature_key(key: str) -> bool:
    """``teachers/NAME/KIND/B`` for a kind of :data:`FEATURE_KINDS` (not logits, progress or ranges)."""
    parts = key.split("/")
    return len(parts) >= 4 and parts[0] == TEACHERS and parts[2] in FEATURE_KINDS


def range_key(key: str) -> str:
    """Where a quantised feature array keeps its rows' ranges: ``teachers/NAME/ranges/KIND/B``."""
    teacher, name = split_teacher_key(key)
    return teacher_key(teacher, f"ranges/{name}")


def view_field(key: str) -> str:
    """The :class:`~meal_cache.views.augment.ViewParams` field a ``views/...`` array holds (``views/ops``: ``ops``)."""
    return key.split("/")[1]
