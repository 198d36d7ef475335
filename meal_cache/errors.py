"""The one exception type for mistakes a user can fix (bad names, missing files, mismatched stores).

The CLI turns it into a single ``Error: ...`` line and exit status 2; library callers catch it like any
``ValueError``.
"""

from __future__ import annotations

import difflib
import re


class UserError(ValueError):
    """Raised for input the user controls: unknown names, missing files, malformed data, mismatches."""


class SettingsMismatch(UserError):
    """An existing output was made with other settings than asked for (resume refused, overwrite needed)."""


class UnreadableFormat(UserError):
    """A meal-cache store of a format this version does not read (a development one, or a newer one)."""


# Above this many choices, an error names the closest ones and where the full list is, not all of them.
MAX_LISTED_CHOICES = 20
# How alike (difflib's ratio) a choice must be to a bad value to be offered as the one meant: 'mael' and 'meal'
# are 0.75 alike, 'cosine' and 'fitnet' 0.5 (a guess, not a typo).
LIKELY_MEANT_CUTOFF = 0.6


def closest_choice(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The choice most like ``name`` (a typo's likely intent: ``meal`` for ``mael``), or None where none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=LIKELY_MEANT_CUTOFF)
    return close[0] if close else None


def unknown_choice(kind: str, name: str, choices: list[str] | tuple[str, ...], listing: str = "") -> UserError:
    """An error naming the bad value and the valid choices (the closest ones, when there are many), and the closest
    choice as what was likely meant."""
    if len(choices) <= MAX_LISTED_CHOICES:
        close = closest_choice(name, choices)
        hint = f"; did you mean {close}?" if close else ""
        return UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(choices))}{hint}")
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    where = f"`{listing}` lists all {len(choices)}" if listing else f"there are {len(choices)} choices"
    return UserError(f"unknown {kind} '{name}'; {hint}{where}")


# A digest (a checkpoint's SHA-256, a dataset fingerprint) tells two settings apart in its first characters; whole,
# it buries the setting's name. Runs of this many hex digits or more are shown by their first SHOWN_HEX.
_LONG_HEX = re.compile(r"\b[0-9a-f]{16,}\b")
SHOWN_HEX = 8
# A refusal names this many differing settings, then counts the rest.
SHOWN_DIFFERENCES = 3
_ABSENT = object()


def settings_difference(old: object, new: object) -> str:
    """The settings that differ between ``old`` (recorded) and ``new`` (asked for), by name, nested dicts
    flattened to their differing leaf: ``teacher_checkpoints.resnet20: 3f2a9c1d… there, 81b0e4aa… now``."""
    if not isinstance(old, dict):
        return "no settings recorded"
    before, after = _leaves(old), _leaves(new if isinstance(new, dict) else {})
    names = [k for k in sorted(set(before) | set(after)) if before.get(k, _ABSENT) != after.get(k, _ABSENT)]
    shown = [f"{k}: {_shown(before.get(k, _ABSENT))} there, {_shown(after.get(k, _ABSENT))} now"
             for k in names[:SHOWN_DIFFERENCES]]  # fmt: skip
    more = len(names) - SHOWN_DIFFERENCES
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "") if names else "none"


def _leaves(settings: dict, prefix: str = "") -> dict[str, object]:
    leaves: dict[str, object] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(_leaves(value, f"{name}."))
        else:
            leaves[name] = value
    return leaves


def _shown(value: object) -> str:
    if value is _ABSENT:
        return "absent"
    text = value if isinstance(value, str) and _LONG_HEX.fullmatch(value) else repr(value)
    return _LONG_HEX.sub(lambda m: m.group(0)[:SHOWN_HEX] + "…", text)
