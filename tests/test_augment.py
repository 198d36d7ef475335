from __future__ import annotations

import torch
import torch.nn.functional as F

from meal_cache.views import augment


def _reference_crop(image: torch.Tensor, box, flip: bool, pad: int) -> torch.Tensor:
    y0, x0, h, w = box
    padded = F.pad(image, (pad, pad, pad, pad))
    out = padded[:, y0 + pad : y0 + pad + h, x0 + pad : x0 + pad + w]
    return out.flip(-1) if flip else out


def test_crop_with_padding_matches_pad_then_slice():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    params = augment.draw(augment.RECIPES["natural"], augment.square_sizes(64, 16), augment.view_generator(3, 0))
    assert params.crop[:, :2].abs().max() <= 2 and params.flip.any() and not params.flip.all()
    out = augment.apply(images, params, (0.0,) * 3, (1.0,) * 3)
    for i in range(64):
        expected = _reference_crop(images[i], params.crop[i].tolist(), bool(params.flip[i]), pad=2).float() / 255
        assert torch.equal(out[i], expected)


def test_digits_recipe_never_flips_and_identity_is_exact():
    params = augment.draw(augment.RECIPES["digits"], augment.square_sizes(500, 16), augment.view_generator(0, 1))
    assert not params.flip.any()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    same = augment.apply(images, augment.identity(augment.square_sizes(4, 16)), mean, std)
    assert torch.allclose(same, augment.normalise(images, mean, std))
    manual = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(same, manual)


def test_views_are_reproducible_and_distinct():
    recipe = augment.RECIPES["natural"]
    a = augment.draw(recipe, augment.square_sizes(100, 32), augment.view_generator(7, 2))
    b = augment.draw(recipe, augment.square_sizes(100, 32), augment.view_generator(7, 2))
    c = augment.draw(recipe, augment.square_sizes(100, 32), augment.view_generator(7, 3))
    assert torch.equal(a.crop, b.crop) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.crop, c.crop)


def test_replay_of_a_subset_of_rows_gives_the_same_pixels():
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    params = augment.draw(augment.RECIPES["natural"], augment.square_sizes(20, 16), augment.view_generator(1, 0))
    full = augment.apply(images, params, (0.5,) * 3, (0.25,) * 3)
    rows = torch.tensor([3, 17, 0])
    part = augment.apply(images[rows], params[rows], (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(full[rows], part)


def test_large_images_use_random_resized_crops_inside_the_image():
    recipe = augment.recipe_for("natural", 96)
    assert recipe.resized_crop_scale is not None
    params = augment.draw(recipe, augment.square_sizes(200, 96), augment.view_generator(0, 0))
    y0, x0, h, w = params.crop.long().unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 96).all() and (x0 + w <= 96).all()
    assert (h * w >= 0.25 * 96 * 96 - 200).all() and (h < 96).any()
    images = torch.randint(0, 256, (200, 3, 96, 96), dtype=torch.uint8)
    out = augment.apply(images, params, (0.0,) * 3, (1.0,) * 3)
    assert out.shape == (200, 3, 96, 96) and out.min() >= 0 and out.max() <= 1
    # A constant image stays constant under any crop-and-resize.
    flat = torch.full((2, 3, 96, 96), 200, dtype=torch.uint8)
    assert torch.allclose(
        augment.apply(flat, params[:2], (0.0,) * 3, (1.0,) * 3), torch.full((2, 3, 96, 96), 200 / 255)
    )
