"""Declarative runs and their reports: a TOML file's steps (teachers, store, students, baselines) run into
``runs/<name>/``, and the report of what they measured.

- :mod:`.config`    :class:`~.config.Pipeline` and :func:`~.config.load_pipeline`, every setting checked first
- :mod:`.stats`     summaries over seeds and paired differences, free of models and data
- :mod:`.markdown`  ``report.md``, one helper a section
- :mod:`.plots`     the report's PNG plots
- :mod:`.report`    ``results.json``, ``report.md`` and the plots of a run
- :mod:`.run`       :func:`~.run.run_pipeline`: every step, skipped when its stamp says nothing changed

Imports every stage (data, views, nets, store, extract, distill, engine, analysis); only the CLI imports it. This
package re-exports nothing: import from its modules.
"""
