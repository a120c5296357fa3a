"""CUB-200-2011 (Wah et al., 2011): 11,788 photos of 200 bird species, in its official layout.

The metric-learning split (Song et al., 2016, and every paper since): classes 1-100 train,
101-200 test. The file train_test_split.txt is the *classification* split (images of all
200 classes on both sides) and is not used.
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

CUB_CLASSES = 200
# Caltech DATA, the dataset's home since vision.caltech.edu retired its downloads; the
# sha256 is tensorflow-datasets' (url_checksums/caltech_birds2011.txt, the same 1,150,585,339
# bytes, md5 97eceeb196236b17998738112f37df78).
CUB_URLS = ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",)
CUB_SHA256 = "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081"
CUB_FIX = (
    "root must be the CUB_200_2011 folder extracted from CUB_200_2011.tgz "
    "(https://data.caltech.edu/records/65de6-vp158), the folder holding images.txt, "
    "image_class_labels.txt, classes.txt and images/; or call load_cub(download=True)"
)


def load_cub(
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    *,
    download: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> FileList:
    """CUB-200-2011's images as a :class:`FileList`, split by class as the papers split it.

    Layout::

        root/images.txt               <image_id> <class folder>/<file>, e.g.
                                      1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
        root/image_class_labels.txt   <image_id> <class_id>, e.g. 1 1
        root/classes.txt              <class_id> <class name>, e.g. 1 001.Black_footed_Albatross
        root/images/<class folder>/<file>

    The first half of the classes of classes.txt (1-100) are the training classes, the
    second half (101-200) the test classes; about ``val_fraction`` of the training classes
    (by ``class_split``'s stable hash of the class name) become "val", for model selection.
    Class names are those of classes.txt. With ``download=True`` (and no ``root``) the
    archive is downloaded once into the cache (``data_dir``, see ``by_name.cache_dir``),
    checked by sha256 and extracted there; nothing is ever written into ``root``.

    Raises FileNotFoundError for a missing folder, index file or image, ValueError for a
    malformed line; warns when classes.txt does not list 200 classes.
    """
    root = choose_root(
        root,
        download,
        "load_cub",
        lambda: (
            fetch_archive("cub", CUB_URLS, CUB_SHA256, "CUB_200_2011.tgz", data_dir, CUB_FIX)
            / "CUB_200_2011"
        ),
    )
    root = dataset_root(root, "CUB-200-2011", CUB_FIX)
    images = read_index(root / "images.txt", ("image_id:int", "path"), CUB_FIX)
    image_labels = dict(
        read_index(root / "image_class_labels.txt", ("image_id:int", "class_id:int"), CUB_FIX)
    )
    classes = read_index(root / "classes.txt", ("class_id:int", "class_name"), CUB_FIX)
    class_ids = [class_id for class_id, _ in classes]
    if class_ids != list(range(1, len(classes) + 1)):
        raise ValueError(f"{root / 'classes.txt'}: class ids must be 1, 2, 3, ...; {CUB_FIX}")
    unlabelled = [image_id for image_id, _ in images if image_id not in image_labels]
    unknown = sorted({c for c in image_labels.values() if not 1 <= c <= len(classes)})
    if unlabelled or unknown:
        raise ValueError(
            f"{root / 'image_class_labels.txt'} does not match images.txt and classes.txt: "
            f"{len(unlabelled)} images without a class (e.g. {unlabelled[:3]}), class ids "
            f"{unknown[:3]} not in classes.txt; {CUB_FIX}"
        )
    check_class_count(len(classes), CUB_CLASSES, "classes", root / "classes.txt")
    class_names = [name for _, name in classes]
    class_splits = [
        official_split(class_id > len(classes) // 2, name, val_fraction)
        for class_id, name in classes
    ]
    paths = [str(root / "images" / path) for _, path in images]
    check_images_exist(paths, root / "images.txt", CUB_FIX)
    labels = [image_labels[image_id] - 1 for image_id, _ in images]
    return file_list_from(root, paths, labels, class_names, class_splits)
