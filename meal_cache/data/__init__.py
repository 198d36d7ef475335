"""Datasets: where a split's images and labels come from, and their pixels as a view's parameters say.

- :mod:`.spec`      a dataset spec's ``?OPTION=VALUE`` modifiers and the seeded draws they call for
- :mod:`.source`    image sources: in-memory uint8 images cropped on the device, image files decoded in workers
- :mod:`.encoded`   rows whose encoded image bytes come from a reader (tar shards, Hugging Face tables), served by
  the image files' workers
- :mod:`.loader`    what a dataset source gives (:class:`~.loader.RawDataset`), :class:`~.loader.DatasetSource`,
  :class:`~.loader.Split` and the helpers sources share
- :mod:`.sources`   one module a source (``digits``, ``digit-pairs``, torchvision's, ``npz:``, ``imagefolder:``,
  ``wds:``, ``hf:``, ``fake``)
- :mod:`.registry`  the sources by name, plug-ins' too (entry-point group ``meal_cache.datasets``)
- :mod:`.datasets`  a spec resolved to an :class:`~.datasets.ImageDataset`: modifiers, normalisation, fingerprints

Imports :mod:`meal_cache.errors`, :mod:`meal_cache.registry`, :mod:`meal_cache.remote` and
:mod:`meal_cache.views`; nothing of nets, store, extract, distill or engine.
This package re-exports nothing: import from its modules.
"""
