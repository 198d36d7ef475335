"""The order in which extract feeds its teachers, for tests that record what a teacher was fed: chunk by chunk,
within a chunk mini-batch by mini-batch of ``batch_size`` rows, within a mini-batch view by view (every view of a
mini-batch's rows is rendered from one decode of each image)."""

from __future__ import annotations

import torch


def fed_per_view(fed: list[torch.Tensor], n: int, views: int, rows_per_chunk: int, batch_size: int) -> torch.Tensor:
    """``(views, n, ...)``: the pixels recorded at one teacher's forward calls (``fed``, in call order) put back
    per view and row; every call must be one mini-batch of one view."""
    out = torch.empty((views, n, *fed[0].shape[1:]), dtype=fed[0].dtype)
    calls = iter(fed)
    for chunk in range(0, n, rows_per_chunk):
        for start in range(chunk, min(n, chunk + rows_per_chunk), batch_size):
            stop = min(n, chunk + rows_per_chunk, start + batch_size)
            for view in range(views):
                out[view, start:stop] = next(calls)
    assert next(calls, None) is None, "more forward calls than (view, mini-batch)s"
    return out


def extract_recording_units(config, out, **kwargs) -> list[tuple]:
    """Run :func:`meal_cache.extract.run.extract` of ``config`` into ``out`` and return the arguments of each unit
    it handed to ``store_arrays`` (one a teacher, view and chunk of rows, or shard): the units that ran."""
    import meal_cache.extract.run as extract_module

    written: list[tuple] = []
    real = extract_module.store_arrays
    extract_module.store_arrays = lambda *args, **options: written.append(args) or real(*args, **options)
    try:
        extract_module.extract(config, out, progress=False, **kwargs)
    finally:
        extract_module.store_arrays = real
    return written
