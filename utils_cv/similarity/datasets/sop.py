"""Stanford Online Products (Song et al., CVPR 2016): 120,053 eBay photos of 22,634 products
in 12 categories, in its official layout. Many classes with few images each (5.3 on
average), like the emoji data.

The split is the files': Ebay_train.txt lists the 11,318 training products (59,551
images), Ebay_test.txt the 11,316 test products (60,502 images).
"""

from __future__ import annotations

import os

from utils_cv.similarity.datasets.file_list import (
    FileList,
    check_class_count,
    check_images_exist,
    choose_root,
    dataset_root,
    fetch_archive,
    file_list_from,
    official_split,
    read_index,
)

SOP_TRAIN_CLASSES, SOP_TEST_CLASSES = 11318, 11316
SOP_COLUMNS = ("image_id:int", "class_id:int", "super_class_id:int", "path")
# The project page's (cvgl.stanford.edu/projects/lifted_struct) FTP link, with the sha256
# tensorflow-datasets recorded for it (url_checksums/stanford_online_products.txt,
# 3,083,860,082 bytes); then the copy on Google Drive that the authors' repository
# (rksltnl/Deep-Metric-Learning-CVPR16) links, which pytorch-metric-learning downloads.
# Either is accepted only with this sha256.
SOP_URLS = (
    "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
    "https://drive.usercontent.google.com/download?id=1TclrpQOF_ullUP99wk_gjGN8pKvtErG8"
    "&export=download&confirm=t",
)
SOP_SHA256 = "b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48"
SOP_FIX = (
    "root must be the Stanford_Online_Products folder extracted from "
    "Stanford_Online_Products.zip (https://cvgl.stanford.edu/projects/lifted_struct/), the "
    "folder holding Ebay_train.txt, Ebay_test.txt and the <category>_final/ image folders; "
    "or call load_sop(download=True)"
)


def load_sop(
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    *,
    download: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> FileList:
    """Stanford Online Products' images as a :class:`FileList`, split as the files say.

    Layout::

        root/Ebay_train.txt    header "image_id class_id super_class_id path", then lines
                               like "1 1 1 bicycle_final/111085122871_0.JPG"
        root/Ebay_test.txt     the same columns, for the test products (class_id 11319 on)
        root/Ebay_info.txt     the same columns for all images (not needed here)
        root/bicycle_final/111085122871_0.JPG ...   one folder per category

    Products of Ebay_test.txt are the test classes; about ``val_fraction`` of those of
    Ebay_train.txt (by ``class_split``'s stable hash of the class name) become "val".
    Classes are named ``class_<class_id>``; each image's super-class is its category
    folder (``super_classes``, e.g. "bicycle_final"). With ``download=True`` (and no
    ``root``) the archive is downloaded once into the cache (``data_dir``), checked by
    sha256 and extracted there; nothing is ever written into ``root``.

    Raises FileNotFoundError for a missing folder, index file or image, ValueError for a
    malformed line or a product listed in both files; warns when the class counts are not
    the official 11,318 and 11,316.
    """
    root = choose_root(
        root,
        download,
        "load_sop",
        lambda: (
            fetch_archive(
                "sop", SOP_URLS, SOP_SHA256, "Stanford_Online_Products.zip", data_dir, SOP_FIX
            )
            / "Stanford_Online_Products"
        ),
    )
    root = dataset_root(root, "Stanford Online Products", SOP_FIX)
    rows = {
        split: read_index(root / f"Ebay_{split}.txt", SOP_COLUMNS, SOP_FIX, header=True)
        for split in ("train", "test")
    }
    classes = {split: {row[1] for row in rows[split]} for split in rows}
    shared = sorted(classes["train"] & classes["test"])
    if shared:
        raise ValueError(
            f"{root / 'Ebay_test.txt'} and Ebay_train.txt share {len(shared)} class ids (e.g. "
            f"{shared[:3]}); the official files split the products; {SOP_FIX}"
        )
    check_class_count(
        len(classes["train"]), SOP_TRAIN_CLASSES, "training products", root / "Ebay_train.txt"
    )
    check_class_count(
        len(classes["test"]), SOP_TEST_CLASSES, "test products", root / "Ebay_test.txt"
    )
    class_ids = sorted(classes["train"] | classes["test"])
    index = {class_id: i for i, class_id in enumerate(class_ids)}
    class_names = [f"class_{class_id}" for class_id in class_ids]
    class_splits = [
        official_split(class_id in classes["test"], name, val_fraction)
        for class_id, name in zip(class_ids, class_names, strict=True)
    ]
    for split in rows:
        listed = [str(root / row[3]) for row in rows[split]]
        check_images_exist(listed, root / f"Ebay_{split}.txt", SOP_FIX)
    every = rows["train"] + rows["test"]
    paths = [str(root / row[3]) for row in every]
    labels = [index[row[1]] for row in every]
    return file_list_from(
        root,
        paths,
        labels,
        class_names,
        class_splits,
        super_classes=[row[3].split("/")[0] for row in every],
    )
