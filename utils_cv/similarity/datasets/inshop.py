"""In-Shop Clothes Retrieval (DeepFashion, Liu et al., CVPR 2016): 52,712 photos of 7,982
clothing items, in its official layout.

The split is the file's: 3,997 training items (25,882 images); the 3,985 test items' images
are divided into a query set (14,218) and a gallery set (12,612), and the benchmark's number
is queries searched in the gallery. Here both sets are split "test", told apart by their
domain, "query" or "gallery", so that the cross-domain view (``cross_domain_pair``) is
exactly that evaluation.
"""

from __future__ import annotations

import os

from utils_cv.similarity.datasets.file_list import (
    FileList,
    check_class_count,
    check_images_exist,
    dataset_root,
    file_list_from,
    official_split,
    read_index,
)

INSHOP_TRAIN_CLASSES, INSHOP_TEST_CLASSES = 3997, 3985
INSHOP_COLUMNS = ("image_name", "item_id", "evaluation_status")
INSHOP_STATUSES = ("train", "query", "gallery")
# No direct download: the data is shared from a Google Drive folder after agreeing to its terms.
INSHOP_FIX = (
    "In-Shop has no direct download: from the DeepFashion page "
    "(http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html) open the Google "
    "Drive folder 'In-shop Clothes Retrieval Benchmark', get Eval/list_eval_partition.txt and "
    "Img/img.zip, and unzip img.zip next to list_eval_partition.txt (or next to its Eval/ "
    "folder), so that root holds list_eval_partition.txt (or Eval/list_eval_partition.txt) and "
    "img/WOMEN/..., img/MEN/...; pass that folder as root"
)


def load_inshop(root: str | os.PathLike, val_fraction: float = 0.2) -> FileList:
    """In-Shop's images as a :class:`FileList`, split as the file says.

    Layout::

        root/Eval/list_eval_partition.txt   (or root/list_eval_partition.txt) first line the
                                            number of images, then the header
                                            "image_name item_id evaluation_status", then lines
                                            like "img/WOMEN/Dresses/id_00000002/02_1_front.jpg
                                            id_00000002 train" (padded with spaces)
        root/img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...

    Items with status "train" are the training classes, about ``val_fraction`` of them (by
    ``class_split``'s stable hash of the item id) "val". Images with status "query" and
    "gallery" are split "test" with domain "query" or "gallery"; ``cross_domain_pair`` then
    gives ("query", "gallery"), the benchmark's evaluation. Classes are named by item id.
    Nothing is ever written.

    Raises FileNotFoundError for a missing folder, file or image, ValueError for a malformed
    line or an item that is both a training and a test item; warns when the item counts are
    not the official 3,997 and 3,985.
    """
    root = dataset_root(root, "In-Shop", INSHOP_FIX)
    index = root / "list_eval_partition.txt"
    if not index.is_file() and (root / "Eval" / index.name).is_file():
        index = root / "Eval" / index.name
    rows = read_index(index, INSHOP_COLUMNS, INSHOP_FIX, header=True, count=True)
    bad = next((row for row in rows if row[2] not in INSHOP_STATUSES), None)
    if bad:
        raise ValueError(
            f"{index}: evaluation_status {bad[2]!r} (of {bad[0]}) is not one of "
            f"{list(INSHOP_STATUSES)}; {INSHOP_FIX}"
        )
    train = {item for _, item, status in rows if status == "train"}
    test = {item for _, item, status in rows if status != "train"}
    if train & test:
        raise ValueError(
            f"{index}: items {sorted(train & test)[:3]} are both training and query/gallery "
            f"items; the official file splits the items; {INSHOP_FIX}"
        )
    check_class_count(len(train), INSHOP_TRAIN_CLASSES, "training items", index)
    check_class_count(len(test), INSHOP_TEST_CLASSES, "query and gallery items", index)
    class_names = sorted(train | test)
    label_of = {item: i for i, item in enumerate(class_names)}
    class_splits = [official_split(item in test, item, val_fraction) for item in class_names]
    paths = [str(root / name) for name, _, _ in rows]
    check_images_exist(paths, index, INSHOP_FIX)
    labels = [label_of[item] for _, item, _ in rows]
    domains = ["" if status == "train" else status for _, _, status in rows]
    return file_list_from(root, paths, labels, class_names, class_splits, domains=domains)
