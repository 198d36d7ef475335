"""Progress bars that suit where they are written: tqdm's own refreshes on a terminal, and few lines in a log.

A bar redraws itself with a carriage return, which a terminal overwrites and a log file keeps: at tqdm's default
of a refresh every 0.1 s, ``make all``'s redirected log held 710 KB of bars. When the bar's stream is not a
terminal, :func:`progress_bar` shows a bar only once it has run :data:`REDIRECTED_REFRESH_S` seconds and then
refreshes it at most that often, so a short bar writes nothing to a log and a long one a line every half minute;
the epoch summaries (``tqdm.write``) are written as before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

REDIRECTED_REFRESH_S = 30.0


def writes_to_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is a terminal (a closed or replaced stream without ``isatty`` is taken as a file)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, refreshed at most every :data:`REDIRECTED_REFRESH_S` seconds and shown only
    after that long where its stream (``file``, default stderr) is not a terminal (module doc). Options given
    explicitly win."""
    if not writes_to_terminal(options.get("file") or sys.stderr):
        for name in ("mininterval", "maxinterval", "delay"):
            options.setdefault(name, REDIRECTED_REFRESH_S)
    return tqdm(iterable, **options)
