"""Small datasets written in the official layouts of the paper benchmarks.

Each writer takes images and labels (e.g. from the built-in data), writes them as JPEGs and
writes the index files exactly as the benchmark distributes them: the same file names,
columns, headers, 1-based ids and path conventions. Classes are given ids 1, 2, ... in label
order, and the official rule assigns them: the first half of the classes are training
classes, the second half test classes. The loaders (``load_cub``, ``load_cars196``,
``load_sop``, ``load_inshop``) read the results as they read the real data, so a notebook
or a test can run a benchmark's whole pipeline in seconds.

Each writer refuses a ``root`` that already holds files, and returns ``root``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Stanford Online Products' twelve categories, in the order of their super_class_id.
SOP_CATEGORIES = (
    "bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle",
    "lamp", "mug", "sofa", "stapler", "table", "toaster",
)  # fmt: skip
# In-Shop's file names end in the view of the photo, e.g. 02_1_front.jpg.
_INSHOP_VIEWS = ("front", "side", "back", "full", "additional")

Images = torch.Tensor | Sequence[Image.Image]


def write_cub_layout(
    root: str | os.PathLike,
    images: Images,
    labels: torch.Tensor | Sequence[int],
    class_names: Sequence[str],
) -> Path:
    """CUB-200-2011's layout (the CUB_200_2011 folder of CUB_200_2011.tgz)::

        images.txt               <image_id> <class folder>/<file>
                                 1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
        image_class_labels.txt   <image_id> <class_id>                1 1
        classes.txt              <class_id> <class folder>            1 001.Black_footed_Albatross
        train_test_split.txt     <image_id> <is_training_image>       1 0
        images/<class folder>/<file>

    A class folder is the 3-digit class id, a dot and the class name with spaces as
    underscores (``001.Black_footed_Albatross``); files are ``<name>_<4 digits>_<n>.jpg``.
    train_test_split.txt is the classification split (alternate images of every class),
    written for completeness; the loaders ignore it.

    images: (N, 3, H, W) uint8 or N PIL images; labels: (N,) int, index into class_names.
    """
    root, pictures, labels = _prepare(root, images, labels, len(class_names))
    folders = [f"{i + 1:03d}.{_token(name)}" for i, name in enumerate(class_names)]
    lines = {"images": [], "labels": [], "split": []}
    seen = [0] * len(class_names)
    for image_id, (picture, label) in enumerate(_by_class(pictures, labels), 1):
        seen[label] += 1
        stem = _token(class_names[label]).title()
        relative = f"{folders[label]}/{stem}_{seen[label]:04d}_{image_id}.jpg"
        _save(picture, root / "images" / relative)
        lines["images"].append(f"{image_id} {relative}")
        lines["labels"].append(f"{image_id} {label + 1}")
        lines["split"].append(f"{image_id} {seen[label] % 2}")
    _write(root / "images.txt", lines["images"])
    _write(root / "image_class_labels.txt", lines["labels"])
    _write(root / "train_test_split.txt", lines["split"])
    _write(root / "classes.txt", [f"{i + 1} {folder}" for i, folder in enumerate(folders)])
    return root


def write_cars196_layout(
    root: str | os.PathLike,
    images: Images,
    labels: torch.Tensor | Sequence[int],
    class_names: Sequence[str],
) -> Path:
    """Cars196's metric-learning layout (car_ims.tgz extracted beside cars_annos.mat)::

        cars_annos.mat      MATLAB file (scipy.io.savemat):
                            annotations  1 x N struct array with fields relative_im_path
                                         ("car_ims/000001.jpg"), bbox_x1, bbox_y1, bbox_x2,
                                         bbox_y2 (the whole image here), class (1-based) and
                                         test (0 or 1)
                            class_names  1 x C cell array of strings
        car_ims/000001.jpg ...   numbered over all images, 6 digits

    The ``test`` flag is the classification split (alternate images of every class), as
    in the real file; the retrieval split is by class and ignores it.

    images: (N, 3, H, W) uint8 or N PIL images; labels: (N,) int, index into class_names.
    """
    import scipy.io  # comes with scikit-learn; imported here, only Cars196 needs it

    root, pictures, labels = _prepare(root, images, labels, len(class_names))
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    records = []
    seen = [0] * len(class_names)
    for image_id, (picture, label) in enumerate(_by_class(pictures, labels), 1):
        seen[label] += 1
        relative = f"car_ims/{image_id:06d}.jpg"
        _save(picture, root / relative)
        width, height = picture.size
        box = [np.uint16(v) for v in (1, 1, width, height)]
        records.append((relative, *box, np.uint16(label + 1), np.uint8(seen[label] % 2)))
    annotations = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for i, record in enumerate(records):
        annotations[0, i] = record
    names = np.empty((1, len(class_names)), dtype=object)
    names[0, :] = list(class_names)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return root


def write_sop_layout(
    root: str | os.PathLike,
    images: Images,
    labels: torch.Tensor | Sequence[int],
    super_classes: Sequence[str] | None = None,
) -> Path:
    """Stanford Online Products' layout (the Stanford_Online_Products folder of its zip)::

        Ebay_train.txt   image_id class_id super_class_id path
                         1 1 1 bicycle_final/111085122871_0.JPG
        Ebay_test.txt    the same header; the test products' images, image_id from 1
        Ebay_info.txt    the same header; every image, image_id from 1
        <category>_final/<product>_<n>.JPG

    Products (classes) get class ids 1, 2, ... in label order; the first half are the
    training products (Ebay_train.txt), the rest the test products (Ebay_test.txt).
    ``super_classes`` names each class's category, one name per class (not per image);
    by default each half is cut into consecutive blocks named after the official
    categories (bicycle, cabinet, ...), as the real files group them. The
    category folder is ``<category>_final`` and super_class_id follows the sorted
    category names, as the official ids follow the alphabet.

    images: (N, 3, H, W) uint8 or N PIL images; labels: (N,) int, index of the class.
    """
    count = int(torch.as_tensor(labels).max()) + 1 if len(labels) else 0
    root, pictures, labels = _prepare(root, images, labels, count)
    if super_classes is None:
        half = count // 2
        super_classes = [
            _blocks(c, half) if c < half else _blocks(c - half, count - half) for c in range(count)
        ]
    if len(super_classes) != count:
        raise ValueError(
            f"super_classes has {len(super_classes)} names, but labels name {count} classes; "
            "give one category per class"
        )
    category_ids = {name: i + 1 for i, name in enumerate(sorted(set(super_classes)))}
    header = "image_id class_id super_class_id path"
    lines = {"train": [header], "test": [header], "info": [header]}
    shots = [0] * count
    for picture, label in _by_class(pictures, labels):
        category = super_classes[label]
        relative = f"{_token(category)}_final/{111085122871 + label}_{shots[label]}.JPG"
        shots[label] += 1
        _save(picture, root / relative)
        split = "train" if label < count // 2 else "test"
        for name in (split, "info"):
            line = f"{len(lines[name])} {label + 1} {category_ids[category]} {relative}"
            lines[name].append(line)
    for name, rows in lines.items():
        _write(root / f"Ebay_{name}.txt", rows)
    return root


def write_inshop_layout(
    root: str | os.PathLike,
    images: Images,
    labels: torch.Tensor | Sequence[int],
) -> Path:
    """In-Shop Clothes Retrieval's layout (its Eval/ folder and img.zip extracted beside it)::

        Eval/list_eval_partition.txt   52712
                                       image_name item_id evaluation_status
                                       img/WOMEN/Dresses/id_00000002/02_1_front.jpg    id_00000002 train
        img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...

    Items (classes) get ids ``id_00000001``, ... in label order; the first half are
    training items (status "train"); of each of the other items, the first image and
    every second one after it are "query" images, the others "gallery" images. The
    image name's column is padded with spaces, as in the real file.

    images: (N, 3, H, W) uint8 or N PIL images; labels: (N,) int, index of the item.
    """
    count = int(torch.as_tensor(labels).max()) + 1 if len(labels) else 0
    root, pictures, labels = _prepare(root, images, labels, count)
    rows = []
    shots = [0] * count
    for picture, label in _by_class(pictures, labels):
        item = f"id_{label + 1:08d}"
        shot = shots[label]
        shots[label] += 1
        name = f"img/WOMEN/Dresses/{item}/01_{shot + 1}_{_INSHOP_VIEWS[shot % 5]}.jpg"
        _save(picture, root / name)
        status = "train" if label < count // 2 else ("query", "gallery")[shot % 2]
        rows.append(f"{name:<59} {item} {status:<10}")
    header = ["image_name item_id evaluation_status"]
    _write(root / "Eval" / "list_eval_partition.txt", [str(len(rows)), *header, *rows])
    return root


def _prepare(
    root: str | os.PathLike, images: Images, labels, classes: int
) -> tuple[Path, list[Image.Image], list[int]]:
    """The empty root, the images as RGB PIL images and the labels as ints, checked."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(
            f"{root} already exists and is not an empty folder; the layout writers write "
            "into a new or empty folder only, so that no data is overwritten"
        )
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be (N, 3, H, W) uint8 or PIL images, got "
                f"{tuple(images.shape)} {images.dtype}"
            )
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        pictures = [Image.fromarray(array) for array in arrays]
    else:
        pictures = [image.convert("RGB") for image in images]
    labels = [int(label) for label in torch.as_tensor(labels).flatten()]
    if len(labels) != len(pictures):
        raise ValueError(f"{len(pictures)} images but {len(labels)} labels; give one per image")
    if labels and not 0 <= min(labels) <= max(labels) < classes:
        raise ValueError(f"labels must be in 0..{classes - 1}, got {min(labels)}..{max(labels)}")
    root.mkdir(parents=True, exist_ok=True)
    return root, pictures, labels


def _by_class(pictures: list[Image.Image], labels: list[int]) -> list[tuple[Image.Image, int]]:
    """(image, label) grouped by class in label order, as the index files list them."""
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    return [(pictures[i], labels[i]) for i in order]


def _blocks(index: int, size: int) -> str:
    """The official category of class ``index`` of ``size`` cut into consecutive blocks."""
    return SOP_CATEGORIES[index * min(len(SOP_CATEGORIES), size) // size]


def _token(name: str) -> str:
    """A class or category name as one token for a path: whitespace and slashes become "_"."""
    return re.sub(r"[\s/\\]+", "_", name.strip()) or "_"


def _save(picture: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="JPEG", quality=95)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
