"""Stage 1: run every teacher once over the views of a dataset split and fill the store.

- :mod:`.divergent`  divergent views: images on which the teachers disagree, found once by a PGD search
- :mod:`.target`     the store an extract writes, created or taken up again, other settings refused by name
- :mod:`.finite`     teacher outputs refused when not finite, each case explained
- :mod:`.config`     :class:`~.config.ExtractConfig`, its checks, the ``--for`` presets (:func:`~.config.store_presets`)
  and the settings fitted to the data
- :mod:`.run`        :func:`~.run.extract`, the pass itself: units of (teacher, view, chunks of rows) written whole

Imports data, views, nets, store, :mod:`meal_cache.dense`, :mod:`meal_cache.projection` and the engine's
distributed helpers. Distill is stage 2 and is not imported, except its method registry inside
:func:`~.config.store_presets`, for ``--for METHOD`` (each method declares what it reads). This package re-exports
nothing: import from its modules.
"""
