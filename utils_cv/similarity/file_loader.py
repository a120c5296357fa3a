"""Datasets that do not fit in memory: a ``FileList``'s images decoded when used.

The built-in datasets live in memory as one uint8 tensor (``training.DeviceDataLoader``).
Stanford Online Products' 120,053 photos at 224 px would need 18 GB that way (72 GB as
float32), so a ``FileList`` (the paper benchmarks, or ``load_image_folder(...,
in_memory=False)``) is read file by file instead, in DataLoader worker processes, a batch at
a time:

- ``decode_rgb``: one file as RGB pixels, exactly those of ``to_rgb`` (what
  ``FileList.load`` keeps in memory). torchvision's ``decode_image`` reads the 8-bit RGB and
  grey JPEGs, with their EXIF orientation, for which it gives Pillow's pixels bit for bit;
  every other file (PNG, GIF, WebP, BMP, TIFF, CMYK JPEG, ...) goes through Pillow and
  ``to_rgb``, which composites transparency onto the background and scales 16-bit images.
- ``FileDataset``: one image at ``image_size`` per item. For evaluation, the geometry of
  ``FileList.load`` (shorter side resized to ``image_size / files.crop_pct`` with Pillow's
  Lanczos filter, centre crop of ``image_size``), so a FileList embeds exactly as the same files loaded in memory do. For
  training, the papers' augmentations of photos (torchvision.transforms.v2): a random
  resized crop (torchvision's default area 8-100 % and aspect 3/4 to 4/3) and a horizontal
  flip half of the time.
- ``FileDataLoader``: batches of it with ``DeviceDataLoader``'s contract, so it serves as
  a fastai train loader (``make_learner`` picks it for a FileList) and feeds ``embed``.

Memory stays bounded: only the batches in flight are decoded (benchmarks/file_dataset_memory.py).
A seed gives the same batches and crops with any number of workers: each image's augmentation
has its own seed, drawn in the main process from the loader's generator with its batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from utils_cv.similarity.datasets.base import DECODE_ERRORS, WHITE, _resize_square, to_rgb

try:  # deprecated since torchvision 0.29 for TorchCodec; Pillow decodes everything without it
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision that has dropped image decoding
    decode_image = None

if TYPE_CHECKING:
    from utils_cv.similarity.datasets import FileList

# Pillow modes of the JPEGs whose pixels torchvision's decoder gives exactly as ``to_rgb``
# does (checked in tests/unit/test_file_dataset.py). CMYK JPEGs, rare in photo datasets and
# written under more than one convention (Adobe's inverted CMYK), are left to Pillow.
TORCHVISION_JPEG_MODES = ("RGB", "L")
# EXIF orientations 5 to 8 turn the image by 90 degrees: height and width swap.
_TRANSPOSING = (5, 6, 7, 8)


def default_num_workers() -> int:
    """Decoding processes for a FileList: one per core this process may use, at most 8."""
    return min(8, len(os.sched_getaffinity(0)))


def decode_rgb(path: str | os.PathLike, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """The image in ``path`` as (3, H, W) uint8 RGB, the pixels of ``to_rgb``.

    RGB and grey JPEGs are decoded by torchvision (EXIF orientation applied); the rest, and
    any file torchvision refuses, by Pillow and ``to_rgb`` (transparency composited onto
    ``background``). Raises ValueError naming the file when neither can read it.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG" and image.mode in TORCHVISION_JPEG_MODES:
                pixels = _torchvision_jpeg(path, image)
                if pixels is not None:
                    return pixels
            return torch.from_numpy(np.array(to_rgb(image, background))).permute(2, 0, 1)
    except DECODE_ERRORS as error:
        raise ValueError(
            f"cannot read image {path} ({error}); the file is damaged or not an image: "
            "replace it, or leave it out of the FileList (FileList.subset)"
        ) from error


def _torchvision_jpeg(path: str | os.PathLike, image: Image.Image) -> torch.Tensor | None:
    """torchvision's pixels of a JPEG that Pillow opened (header only), or None to let
    Pillow decode it: when torchvision refuses the file or turns it otherwise than
    ``ImageOps.exif_transpose`` would."""
    if decode_image is None:
        return None
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image decoders (TorchCodec replaces them) and
            # says so in every worker process; they are still 1.6x faster than Pillow on a
            # 500 x 375 JPEG (1.0 ms against 1.6 ms here), and Pillow takes over when they go.
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities")
            pixels = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        return None
    orientation = image.getexif().get(0x0112, 1)  # EXIF "Orientation"
    width, height = image.size
    expected = (width, height) if orientation in _TRANSPOSING else (height, width)
    if pixels.dtype != torch.uint8 or tuple(pixels.shape) != (3, *expected):
        return None
    return pixels


def square_crop(pixels: torch.Tensor, image_size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """(3, image_size, image_size) uint8: ``pixels`` (3, H, W) uint8 RGB with the shorter
    side resized to ``image_size / crop_pct`` and the centre cropped, by ``FileList.load``'s
    own function (Pillow's Lanczos filter), so the result equals the in-memory one exactly."""
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    array = np.array(_resize_square(image, image_size, crop_pct=crop_pct))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def photo_augmentation(image_size: int) -> v2.Transform:
    """The papers' training augmentation of photos: ``RandomResizedCrop(image_size)``
    (area 8-100 %, aspect 3/4 to 4/3, bilinear with antialiasing) and a horizontal flip
    with probability 0.5, on (3, H, W) uint8 tensors."""
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


class FileDataset(Dataset):
    """A FileList's images, decoded when an item is asked for (in a worker process).

    ``dataset[i]`` or ``dataset[(i, seed)]`` is ``(image, label)``: image (3, image_size,
    image_size) uint8, label an int. Without ``augment``: ``square_crop`` (the geometry of
    ``FileList.load``). With it: ``photo_augmentation``, drawn from ``seed`` (the global
    random generator is left as it was) or, without one, from torch's global generator.
    """

    def __init__(
        self,
        files: FileList,
        image_size: int,
        augment: bool = False,
        background: tuple[int, int, int] = WHITE,
    ):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive integer")
        # Plain values: a label is collated into an int64 tensor; nothing here holds pixels.
        self.paths = list(files.paths)
        self.labels = files.labels.tolist()
        self.image_size = image_size
        self.crop_pct = files.crop_pct
        self.background = background
        self.transform = photo_augmentation(image_size) if augment else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        pixels = decode_rgb(self.paths[index], self.background)
        if self.transform is None:
            return square_crop(pixels, self.image_size, self.crop_pct), self.labels[index]
        if seed is None:
            return self.transform(pixels).contiguous(), self.labels[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(pixels).contiguous(), self.labels[index]


class IndexBatches:
    """What ``FileDataLoader`` and ``training.DeviceDataLoader`` share: the batching
    arguments and their checks, the number of batches, the order of the indices (a
    permutation from the loader's seeded generator, or the batch sampler's lists) and
    ``one_batch``. A subclass calls ``_set_batching`` and says how many items it has."""

    def _set_batching(
        self,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        batch_sampler: Iterable[Sequence[int]] | None,
        seed: int,
    ) -> None:
        if batch_sampler is not None and not hasattr(batch_sampler, "__len__"):
            raise TypeError(
                f"batch_sampler {type(batch_sampler).__name__} has no len(); fastai needs the "
                "number of batches per epoch, so give the sampler a __len__"
            )
        if batch_sampler is None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.batch_sampler = batch_sampler
        self.generator = torch.Generator().manual_seed(seed)

    def _num_items(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        if self.drop_last:
            return self._num_items() // self.batch_size
        return -(-self._num_items() // self.batch_size)

    def _batch_indices(self) -> Iterator[Sequence[int] | torch.Tensor]:
        if self.batch_sampler is not None:
            yield from self.batch_sampler
            return
        n = self._num_items()
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]

    def one_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of a pass (to look at, or for fastai's ``summary``)."""
        return next(iter(self))


class FileDataLoader(IndexBatches):
    """Batches of a ``FileList``, decoded (and augmented) in worker processes.

    The contract of ``training.DeviceDataLoader``: each batch is ``(images, labels)``,
    images (B, 3, image_size, image_size) float in [0, 1], labels (B,) int64, both on
    ``device``; ``len()`` is the number of batches; it serves as a fastai train loader.
    Batches travel as uint8 (pinned on CUDA) and become floats on ``device``.

    Args:
        files: the image files and labels.
        image_size: the side of the square images.
        batch_size, shuffle, drop_last, batch_sampler: as for ``DeviceDataLoader``.
        augment: True: ``photo_augmentation`` (random resized crop, horizontal flip);
            False: ``square_crop``, the in-memory geometry.
        num_workers: decoding processes; 0 decodes in this process; None:
            ``default_num_workers()``.
        device: where batches go; None: the CPU.
        seed: seeds the order and every image's augmentation. The same seed gives the same
            batches with any ``num_workers``; without augmentation, the batches of a
            ``DeviceDataLoader`` with that seed.
        background: the colour transparent pixels are composited onto.
    """

    def __init__(
        self,
        files: FileList,
        image_size: int,
        batch_size: int = 64,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        batch_sampler: Iterable[Sequence[int]] | None = None,
        num_workers: int | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        background: tuple[int, int, int] = WHITE,
    ):
        if not isinstance(augment, bool):
            raise ValueError(
                f"augment={augment!r}: a FileList takes True (random resized crop and "
                "horizontal flip) or False; strengths are for in-memory data (augment_batch)"
            )
        self._set_batching(batch_size, shuffle, drop_last, batch_sampler, seed)
        self.dataset = FileDataset(files, image_size, augment, background)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def _num_items(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers start for each pass and end with it: nothing decoded outlives a pass.
        loader = DataLoader(
            self.dataset,
            batch_sampler=_SeededBatches(self),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # torch draws a base seed for the workers' global generators from this (they are
            # not used: every draw comes from an image's own seed), not from this process's
            # global generator, which iterating a loader then leaves as it was.
            generator=torch.Generator().manual_seed(0),
        )
        batches = iter(loader)
        try:
            for images, labels in batches:
                images = images.to(self.device, non_blocking=True)
                yield images.float() / 255, labels.to(self.device, non_blocking=True)
        finally:
            # After an error (an unreadable file) the traceback keeps torch's iterator alive,
            # and its workers, when the garbage collector ends them, took 5 s each to join:
            # end them now, as torch does at the end of a pass.
            shutdown = getattr(batches, "_shutdown_workers", None)  # with workers only
            if shutdown is not None:
                shutdown()

    def to(self, device: torch.device | str) -> FileDataLoader:
        """Send the batches to ``device`` (fastai calls this when the ``DataLoaders`` move)."""
        self.device = torch.device(device)
        return self


class _SeededBatches:
    """A loader's batches; when it augments, as lists of (index, seed), each image's
    augmentation seed drawn here, in the main process, in batch order: the same whichever
    worker decodes it. Without augmentation the generator draws only the order, so the
    batches are those of a ``DeviceDataLoader`` with the same seed."""

    def __init__(self, loader: FileDataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        for batch in self.loader._batch_indices():
            index = torch.as_tensor(batch, dtype=torch.long).tolist()
            if self.loader.dataset.transform is None:
                yield index
                continue
            seeds = torch.randint(2**62, (len(index),), generator=self.loader.generator)
            yield list(zip(index, seeds.tolist(), strict=True))
