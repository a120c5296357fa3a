"""A dataset as a list of image files (paths, labels, splits, no pixels), and the checks the
loaders of the paper benchmarks share.

CUB-200-2011, Cars196, Stanford Online Products and In-Shop hold 12,000 to 120,000 photos,
too many to keep decoded at full size. Their loaders (``cub``, ``cars196``, ``sop``,
``inshop``) return a :class:`FileList`; ``FileList.load`` decodes it into an ``ImageData``
at one size, exactly as ``load_image_folder`` reads a folder; too large for memory, it is
decoded batch by batch instead (``utils_cv.similarity.file_loader``: ``make_learner``,
``train_run`` and ``embed`` take a FileList where they take an ImageData). The helpers below read the
benchmarks' index files line by line, list images that are missing, compare class counts
with the official ones and download an archive into the cache, always with a message that
names the file and the fix.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from utils_cv.common.download import download, safe_extract
from utils_cv.similarity.datasets.base import (
    DECODE_ERRORS,
    WHITE,
    ImageData,
    PerImageFields,
    _resize_square,
    _to_tensor,
    check_crop_pct,
    class_split,
)

# Missing images are listed up to this many in an error (the count is always complete).
_MAX_LISTED = 5


@dataclass
class FileList(PerImageFields):
    """Image files with labels, class names, splits and domains, not yet decoded.

    root: the dataset's folder, as given to its loader.
    paths: (N,) absolute path of each image file.
    labels: (N,) int64, index into ``class_names``.
    class_names: global list of class names; labels index into it.
    splits: (N,) "train" | "val" | "test" per image.
    domains: (N,) per image, e.g. In-Shop's "query" and "gallery"; "" where not meaningful.
    super_classes: (N,) per image (Stanford Online Products' categories, e.g.
    "bicycle_final"), or None.
    crop_pct: how an image is made square for evaluation (``load`` and a loader without
    augmentation): the shorter side resized to image_size / crop_pct, then the centre
    image_size cropped. 1.0 keeps the whole shorter side; 0.875 is the papers' and
    torchvision's 256 -> 224 (timm's ``crop_pct``). ``catalogue.index_images`` stores it in
    the index, so that query files are loaded with the same crop.
    """

    root: Path
    paths: list[str]
    labels: torch.Tensor
    class_names: list[str]
    splits: list[str]
    domains: list[str]
    super_classes: list[str] | None = None
    crop_pct: float = 1.0

    _per_image: ClassVar[tuple[str, ...]] = (
        "paths",
        "labels",
        "splits",
        "domains",
        "super_classes",
    )

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._check_per_image()
        check_crop_pct(self.crop_pct)
        relative = [p for p in self.paths if not os.path.isabs(p)]
        if relative:
            raise ValueError(
                f"{len(relative)} paths are relative, e.g. {relative[0]!r}; give absolute paths "
                "(root / path) so the list reads the same from any working directory"
            )

    def __repr__(self) -> str:
        return (
            f"FileList({len(self)} images under {self.root}, {self.num_classes} classes, "
            f"splits {self._split_counts()})"
        )

    def load(self, image_size: int, background: tuple[int, int, int] = WHITE) -> ImageData:
        """Every file decoded as ``load_image_folder`` decodes images: RGB as ``to_rgb`` says
        (EXIF orientation, transparency onto ``background``), shorter side resized to
        ``image_size / crop_pct``, the centre ``image_size`` cropped. Labels, class names,
        splits, domains and paths are kept (super-classes are not: ImageData has no field
        for them).

        Raises ValueError naming the first file that cannot be decoded; a benchmark's files
        are all expected to be readable, so none is skipped silently.
        """
        images = []
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    images.append(_resize_square(image, image_size, background, self.crop_pct))
            except DECODE_ERRORS as error:
                raise ValueError(
                    f"cannot read image {path} ({error}); the file is damaged or not an image: "
                    "extract it again from the dataset's archive, or leave it out with "
                    "FileList.subset"
                ) from error
        return ImageData(
            images=_to_tensor(images),
            labels=self.labels.clone(),
            class_names=list(self.class_names),
            splits=list(self.splits),
            domains=list(self.domains),
            paths=list(self.paths),
        )


def dataset_root(root: str | os.PathLike, dataset: str, fix: str) -> Path:
    """``root`` as an absolute Path; FileNotFoundError naming ``dataset`` and ``fix`` when it
    is not a folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} folder {root} does not exist; {fix}")
    return root.absolute()


def file_list_from(
    root: Path,
    paths: list[str],
    labels: list[int],
    class_names: list[str],
    class_splits: list[str],
    *,
    domains: list[str] | None = None,
    super_classes: list[str] | None = None,
) -> FileList:
    """A loader's FileList: each image split as its class (``class_splits[label]``), domains
    "" unless given."""
    return FileList(
        root=root,
        paths=paths,
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
        splits=[class_splits[label] for label in labels],
        domains=[""] * len(paths) if domains is None else domains,
        super_classes=super_classes,
    )


def read_index(
    path: Path, columns: Sequence[str], fix: str, *, header: bool = False, count: bool = False
) -> list[list]:
    """The rows of a whitespace-separated index file, one list of values per line.

    ``columns`` names the values of a line in order; a name ending in ":int" is parsed as
    an integer, e.g. ``("image_id:int", "path")`` for CUB's images.txt. With ``header``
    the first line must be the column names (Stanford Online Products), with ``count`` a
    first line holds the number of rows (In-Shop, whose header follows it). Blank lines
    are skipped. Raises FileNotFoundError for a missing file and ValueError naming the
    file, the line and ``fix`` for a malformed one.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}")
    names = [c.removesuffix(":int") for c in columns]
    lines = [
        (number, line.split())
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    expected = None
    if count:
        if not lines or len(lines[0][1]) != 1 or not lines[0][1][0].isdigit():
            raise ValueError(f"{path}: the first line must be the number of images; {fix}")
        expected = int(lines.pop(0)[1][0])
    if header:
        if not lines or lines[0][1] != names:
            found = " ".join(lines[0][1]) if lines else "nothing"
            raise ValueError(
                f"{path}: the header line must be {' '.join(names)!r}, found {found!r}; {fix}"
            )
        lines.pop(0)
    rows = []
    for number, values in lines:
        try:
            if len(values) != len(columns):
                raise ValueError
            rows.append(
                [int(v) if c.endswith(":int") else v for v, c in zip(values, columns, strict=True)]
            )
        except ValueError:
            raise ValueError(
                f"{path}, line {number}: expected {len(columns)} values "
                f"({' '.join(names)}), found {' '.join(values)!r}; {fix}"
            ) from None
    if expected is not None and expected != len(rows):
        raise ValueError(
            f"{path}: its first line says {expected} images but it lists {len(rows)}; the file "
            f"is cut short or edited; {fix}"
        )
    return rows


def check_images_exist(paths: Sequence[str], index: Path, fix: str) -> None:
    """FileNotFoundError listing the first few of ``paths`` (listed in ``index``) that do
    not exist, with their count and ``fix``."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images listed in {index} are missing:\n  "
            f"{shown}{more}\n{fix}"
        )


def check_class_count(found: int, official: int, what: str, index: Path) -> None:
    """Warn when ``index`` lists another number of ``what`` (e.g. "training classes") than
    the official data has (a partial copy, or a small fixture such as the tests write)."""
    if found != official:
        warnings.warn(
            f"{index} lists {found:,} {what}; the official dataset has {official:,}. "
            "Fine for a fixture or a subset; for the papers' numbers download the whole "
            "dataset again",
            stacklevel=3,
        )


def official_split(is_test: bool, name: str, val_fraction: float) -> str:
    """The split of a class: "test" for the official test classes; of the training classes
    about ``val_fraction`` go to "val" by ``class_split``'s stable hash of ``name``."""
    return "test" if is_test else class_split(name, test_fraction=0.0, val_fraction=val_fraction)


def choose_root(
    root: str | os.PathLike | None, download: bool, dataset: str, fetched: Callable[[], Path]
) -> Path:
    """``root`` as a Path, or the folder ``fetched()`` downloads into the cache when
    ``download`` is set; ValueError when neither or both are given."""
    if (root is None) == (not download):
        raise ValueError(
            f"{dataset}: pass root (the dataset's folder) or download=True (fetched into the "
            "cache, data_dir), not both and not neither; nothing is ever written into root"
        )
    return Path(root).expanduser() if root is not None else fetched()


def fetch_archive(
    name: str,
    urls: Sequence[str],
    sha256: str,
    filename: str,
    data_dir: str | os.PathLike | None,
    fix: str,
) -> Path:
    """``<cache>/<name>``, holding ``filename`` extracted (downloaded first when missing).

    Each of ``urls`` is tried in turn; the archive must match ``sha256``. It is extracted
    by ``safe_extract`` into a temporary folder of the cache, renamed into place when
    complete (an interrupted extraction is never mistaken for a finished one); the archive
    is then deleted. Raises OSError naming the URLs and ``fix`` when none could be fetched.
    """
    # Imported when needed: by_name imports the dataset modules, and will import the
    # loaders once load_dataset names the benchmarks (a circle at import time).
    from utils_cv.similarity.datasets.by_name import cache_dir

    cache = cache_dir(data_dir)
    folder = cache / name
    if folder.is_dir():
        return folder
    archive = cache / "downloads" / filename
    failures = []
    for url in urls:
        try:
            download(url, archive, sha256, timeout=120)
            break
        except (OSError, ValueError) as error:  # urllib's errors are OSErrors
            failures.append(f"{url}: {error}")
    else:
        raise OSError(f"could not download {filename}:\n  " + "\n  ".join(failures) + f"\n{fix}")
    partial = cache / f".{name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        safe_extract(archive, partial)
        try:
            os.rename(partial, folder)
        except OSError:
            if not folder.is_dir():  # else another process finished the same extraction
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    archive.unlink(missing_ok=True)
    return folder
