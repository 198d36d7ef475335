"""The one exception type for mistakes a user can fix (bad names, missing files, mismatched stores).

The CLI turns it into a single ``Error: ...`` line and exit status 2; library callers catch it like any
``ValueError``.
"""

from __future__ import annotations

import difflib


class UserError(ValueError):
    """Raised for input the user controls: unknown names, missing files, malformed data, mismatches."""


class SettingsMismatch(UserError):
    """An existing output was made with other settings than asked for (resume refused, overwrite needed)."""


# Above this many choices, an error names the closest ones and where the full list is, not all of them.
MAX_LISTED_CHOICES = 20


def unknown_choice(kind: str, name: str, choices: list[str] | tuple[str, ...], listing: str = "") -> UserError:
    """An error naming the bad value and the valid choices (the closest ones, when there are many)."""
    if len(choices) <= MAX_LISTED_CHOICES:
        return UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(choices))}")
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    where = f"`{listing}` lists all {len(choices)}" if listing else f"there are {len(choices)} choices"
    return UserError(f"unknown {kind} '{name}'; {hint}{where}")
