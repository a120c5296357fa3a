"""Augmentation of whole batches on the device they live on.

The built-in datasets sit in memory, on the GPU when there is one, so augmenting a batch
there is faster than augmenting images one by one on the CPU. One ``grid_sample`` call does
the geometry for the whole batch (random resized crop and a small rotation); colour jitter
follows as a few tensor operations.

There are no horizontal flips: a mirrored left arrow is a right arrow, another class.

The random parameters are drawn on the CPU, from ``generator`` when given, so a seeded
run gets the same augmentations on every device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ranges at strength 1; strength scales each range towards "no change".
MIN_SCALE = 0.6  # smallest crop, as a share of the image area
MAX_ASPECT = 4 / 3  # crop aspect ratios lie in [3/4, 4/3]
MAX_ROTATION_DEGREES = 10.0
BRIGHTNESS = 0.2  # factors lie in [1 - 0.2, 1 + 0.2]
CONTRAST = 0.2
SATURATION = 0.2
MAX_STRENGTH = 2.0  # beyond this the smallest crop would reach zero area


def augment_batch(
    images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0
) -> torch.Tensor:
    """Random resized crop, small rotation and colour jitter, one draw per image.

    Args:
        images: (N, 3, H, W) float in [0, 1], on any device.
        generator: a CPU ``torch.Generator`` for repeatable draws; None uses torch's global RNG.
        strength: 0 returns the images unchanged, 1 uses the ranges above (crops of 60-100 %
            of the area, aspect 3/4 to 4/3, rotations within ±10°, brightness, contrast and
            saturation factors within ±20 %); at most 2.

    Returns:
        (N, 3, H, W) float in [0, 1]. Pixels from outside the image are white, because the
        emoji are drawn on white.
    """
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be (N, 3, H, W) float in [0, 1], got {tuple(images.shape)} "
            f"{images.dtype}; convert uint8 with images.float() / 255"
        )
    if not 0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"strength={strength} is outside [0, {MAX_STRENGTH}]")
    n, _, height, width = images.shape
    theta = sample_affine(n, height, width, generator, strength).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with zeros (black); sampling the inverted image pads with white.
    warped = 1 - F.grid_sample(1 - images, grid, mode="bilinear", align_corners=False)
    factors = _sample_uniform((n, 3), generator, strength, (BRIGHTNESS, CONTRAST, SATURATION))
    return _jitter_colour(warped, factors.to(images))


def sample_affine(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Affine matrices for ``F.affine_grid``: crop of random area and aspect, then rotation.

    Each matrix maps output coordinates to input coordinates (both in [-1, 1]). Its x scale
    is always positive: no matrix mirrors the image.

    Returns:
        theta: (n, 2, 3) float32 on the CPU.
    """
    min_scale = 1 - (1 - MIN_SCALE) * strength
    area = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)
    aspect = (math.log(MAX_ASPECT) * strength * _symmetric(n, generator)).exp()
    # Crop width and height as shares of the image; a crop never exceeds the image.
    crop_w = (area * aspect).sqrt().clamp(max=1)
    crop_h = (area / aspect).sqrt().clamp(max=1)
    # Crop centre anywhere that keeps the crop inside the image.
    centre_x = (1 - crop_w) * _symmetric(n, generator)
    centre_y = (1 - crop_h) * _symmetric(n, generator)
    angle = math.radians(MAX_ROTATION_DEGREES) * strength * _symmetric(n, generator)
    cos, sin = angle.cos(), angle.sin()
    # A rotation in pixels, written in normalized coordinates (x spans W pixels, y spans H).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = crop_w * cos
    theta[:, 0, 1] = -crop_w * sin * height / width
    theta[:, 0, 2] = centre_x
    theta[:, 1, 0] = crop_h * sin * width / height
    theta[:, 1, 1] = crop_h * cos
    theta[:, 1, 2] = centre_y
    return theta


def _symmetric(shape: int | tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in [-1, 1]."""
    return 2 * torch.rand(shape, generator=generator) - 1


def _sample_uniform(
    shape: tuple[int, int],
    generator: torch.Generator | None,
    strength: float,
    spreads: tuple[float, ...],
) -> torch.Tensor:
    """Factors in [1 - spread * strength, 1 + spread * strength], one column per spread."""
    spread = torch.tensor(spreads) * strength
    return 1 + spread * _symmetric(shape, generator)


def _jitter_colour(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation; factors: (N, 3), one column each."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    images = (images * brightness).clamp(0, 1)
    # ITU-R 601 luma, as torchvision uses for grayscale.
    luma = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    gray = (images * luma.view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    images = (mean + contrast * (images - mean)).clamp(0, 1)
    gray = (images * luma.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (gray + saturation * (images - gray)).clamp(0, 1)


def occlude(images: torch.Tensor, size: float, seed: int = 0, value: float = 0.0) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W), each with a square of side ``size`` x min(H, W)
    set to ``value`` at a random place (seeded; the square lies inside the image).

    For robustness tests: occluded queries searching clean references. ``size`` is a share
    of the image side in [0, 1]; 0 returns an unchanged copy.
    """
    if not 0 <= size <= 1:
        raise ValueError(f"size={size} must be a share of the image side, between 0 and 1")
    if images.ndim != 4:
        raise ValueError(f"images must be a batch (N, C, H, W), got {tuple(images.shape)}")
    images = images.clone()
    height, width = images.shape[-2:]
    side = round(size * min(height, width))
    if side == 0:
        return images
    generator = torch.Generator().manual_seed(seed)
    tops = torch.randint(0, height - side + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(0, width - side + 1, (len(images),), generator=generator).tolist()
    for image, top, left in zip(images, tops, lefts, strict=True):
        image[..., top : top + side, left : left + side] = value
    return images
