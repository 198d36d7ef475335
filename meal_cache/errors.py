"""The one exception type for mistakes a user can fix (bad names, missing files, mismatched stores).

The CLI turns it into a single ``Error: ...`` line and exit status 2; library callers catch it like any
``ValueError``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Raised for input the user controls: unknown names, missing files, malformed data, mismatches."""


class SettingsMismatch(UserError):
    """An existing output was made with other settings than asked for (resume refused, overwrite needed)."""


def unknown_choice(kind: str, name: str, choices: list[str] | tuple[str, ...]) -> UserError:
    """An error naming the bad value and every valid choice."""
    return UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(choices))}")
