"""The built-in dataset sources, one module each; each module's ``SOURCES`` names its
:class:`~meal_cache.data.loader.DatasetSource` objects (:mod:`meal_cache.data.registry` finds them)."""
