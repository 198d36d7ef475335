"""Generated image folders for the tests: JPEGs of varied sizes and aspect ratios, smooth enough to compress as
photographs do, with a class signal (each class has its own mean colour) so small networks can learn them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Ten hues a small network tells apart at 32 px.
_COLOURS = np.array(
    [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200], [40, 200, 200], [230, 230, 230],
     [30, 30, 30], [230, 120, 30], [120, 30, 230]], dtype=np.float64,
)  # fmt: skip


def write_image(path: Path, height: int, width: int, colour: np.ndarray, rng: np.random.Generator,
                mode: str = "RGB") -> None:  # fmt: skip
    coarse = rng.normal(0, 40, size=(max(2, height // 16), max(2, width // 16), 3)) + colour
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    image = small.resize((width, height), Image.BILINEAR).convert(mode)
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)


def make_image_folder(root: Path, classes: int = 10, train: int = 4, val: int = 2, sizes: tuple[int, int] = (150, 500),
                      seed: int = 0) -> Path:  # fmt: skip
    """``root/train/cNN/*.jpg`` and ``root/val/cNN/*.jpg``: ``train`` and ``val`` images per class, each side
    drawn from ``sizes``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
                write_image(folder / f"{index}.jpg", height, width, _COLOURS[label % len(_COLOURS)], rng)
    return root
