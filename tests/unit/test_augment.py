"""On-device batch augmentation."""

from __future__ import annotations

import pytest
import torch

from utils_cv.similarity import augment
from utils_cv.similarity.augment import augment_batch, occlude, sample_affine


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_range_are_kept():
    images = torch.rand(8, 3, 20, 24)
    out = augment_batch(images, _generator(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)


def test_seeded_generator_repeats_and_seeds_differ():
    images = torch.rand(6, 3, 16, 16)
    first = augment_batch(images, _generator(1))
    again = augment_batch(images, _generator(1))
    other = augment_batch(images, _generator(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_strength_zero_is_the_identity():
    images = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(augment_batch(images, _generator(0), strength=0), images)


def test_no_matrix_mirrors_the_image():
    theta = sample_affine(2000, 32, 32, _generator(0), strength=2.0)
    assert (theta[:, 0, 0] > 0).all() and (theta[:, 1, 1] > 0).all()
    assert (torch.linalg.det(theta[:, :, :2]) > 0).all()


def test_left_right_layout_survives():
    # Dark left half, white right half: a flip would put the dark half on the right.
    images = torch.ones(64, 3, 32, 32)
    images[..., :16] = 0.1
    out = augment_batch(images, _generator(0))
    left, right = out[..., :16].mean(dim=(1, 2, 3)), out[..., 16:].mean(dim=(1, 2, 3))
    assert (left < right - 0.3).all()


def test_crops_stay_within_the_configured_range():
    theta = sample_affine(2000, 32, 32, _generator(0), strength=1.0)
    # Without rotation the determinant is the crop's share of the area (the matrix scales
    # output coordinates into the input); rotation leaves it unchanged.
    area = torch.linalg.det(theta[:, :, :2])
    assert area.min() >= augment.MIN_SCALE * 0.999 and area.max() <= 1.0001
    angle = torch.atan2(theta[:, 1, 0], theta[:, 1, 1]).rad2deg().abs()
    assert angle.max() <= augment.MAX_ROTATION_DEGREES + 1e-4


def test_pixels_from_outside_the_image_are_white(monkeypatch):
    # Zoom out by two: the outer ring of the output samples outside the input.
    def zoom_out(n, height, width, generator=None, strength=1.0):
        return torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]).expand(n, 2, 3)

    monkeypatch.setattr(augment, "sample_affine", zoom_out)
    out = augment_batch(torch.zeros(2, 3, 16, 16), _generator(0), strength=0)
    assert torch.equal(out[..., 0, :], torch.ones(2, 3, 16))
    assert torch.equal(out[..., 8, 8], torch.zeros(2, 3))


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"float\(\) / 255"):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="strength"):
        augment_batch(torch.rand(2, 3, 8, 8), strength=3)


def test_occlude_blanks_one_square_of_the_asked_side_per_image():
    images = torch.full((5, 3, 20, 10), 200, dtype=torch.uint8)
    out = occlude(images, 0.3, seed=1)
    assert torch.equal(images, torch.full_like(images, 200))  # the input is not changed
    for image in out:
        blank = (image == 0).all(dim=0)  # all channels blanked
        rows, cols = blank.any(dim=1).nonzero().flatten(), blank.any(dim=0).nonzero().flatten()
        assert blank.sum() == 3 * 3  # side round(0.3 * min(20, 10)) = 3
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
    assert torch.equal(out, occlude(images, 0.3, seed=1))  # seeded
    assert not torch.equal(out, occlude(images, 0.3, seed=2))
    assert torch.equal(occlude(images, 0.0), images)
    full = (occlude(images, 1.0) == 0).all(dim=1).sum(dim=(1, 2))
    assert (full == 100).all()  # a 10 x 10 square: the image's full width
    with pytest.raises(ValueError, match="between 0 and 1"):
        occlude(images, 1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        occlude(images[0], 0.3)
