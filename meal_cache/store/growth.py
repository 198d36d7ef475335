"""Stores that grow (``extract`` with added teachers or more augmented views onto a store): whether one store's
settings are another's grown, and a grown store read as it was before, so a distill run started on it resumes.
Imports :mod:`.teacher_store`."""

from __future__ import annotations

from meal_cache.store.teacher_store import TeacherStore

# The settings a growth may change: the teachers (added, never dropped or retrained) and the augmented views (more).
GROWING = ("teachers", "teacher_checkpoints", "views")


def _kept_and_same(recorded: object, settings: dict) -> bool:
    """Every recorded teacher in ``settings`` with its checkpoint, no fewer views, and nothing else changed."""
    if not isinstance(recorded, dict):
        return False
    had, has = recorded.get("teacher_checkpoints", {}), settings.get("teacher_checkpoints", {})
    kept = all(has.get(key) == checkpoint for key, checkpoint in had.items())
    fewer = settings.get("views", 0) < recorded.get("views", 0)
    same = {k: v for k, v in recorded.items() if k not in GROWING} == {
        k: v for k, v in settings.items() if k not in GROWING
    }
    return kept and not fewer and same


def grows_by_teachers(recorded: object, settings: dict) -> bool:
    """Whether ``settings`` are ``recorded`` with teachers added and nothing else changed (the views as well)."""
    if not isinstance(recorded, dict):
        return False
    added = len(settings.get("teacher_checkpoints", {})) > len(recorded.get("teacher_checkpoints", {}))
    return _kept_and_same(recorded, settings) and settings.get("views") == recorded.get("views") and added


def grows_by_views(recorded: object, settings: dict) -> bool:
    """Whether ``settings`` are ``recorded`` with more augmented views and nothing else changed (the teachers as
    well): view ``v`` is drawn from the seed and ``v`` alone, so the first views are the ones already stored."""
    if not isinstance(recorded, dict):
        return False
    return (_kept_and_same(recorded, settings) and settings.get("views", 0) > recorded.get("views", 0)
            and settings.get("teacher_checkpoints") == recorded.get("teacher_checkpoints"))  # fmt: skip


class StoreBeforeGrowth(TeacherStore):
    """A grown store read as it was when ``recorded`` were its settings: its first teachers and views only, which
    hold the same values they held then."""

    def __init__(self, store: TeacherStore, recorded: dict) -> None:
        super().__init__(store.group, store.location)
        self.recorded = recorded

    @property
    def attrs(self) -> dict:
        attrs = dict(self.group.attrs)
        kept = self.recorded["teacher_checkpoints"]
        attrs["teachers"] = {key: spec for key, spec in attrs["teachers"].items() if key in kept}
        if attrs["views"]["augmented"] != self.recorded["views"]:  # grown by views: a store of augmented views only
            attrs["views"] = {**attrs["views"], "count": self.recorded["views"], "augmented": self.recorded["views"]}
        attrs["settings"] = self.recorded
        return attrs


def as_recorded(store: TeacherStore, recorded: object) -> TeacherStore:
    """``store`` as it was with the ``recorded`` settings where it has grown since (see :class:`StoreBeforeGrowth`),
    else ``store`` itself (other differences are refused by whoever compares the settings)."""
    settings = store.attrs.get("settings")
    if isinstance(recorded, dict) and recorded != settings and _kept_and_same(recorded, settings):
        return StoreBeforeGrowth(store, recorded)
    return store
