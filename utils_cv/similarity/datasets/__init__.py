"""Datasets for retrieval: one container (``base.ImageData``), then one file per dataset.

- ``base``: ``ImageData``, the class split and the fixed example queries;
- ``emoji``: the cross-design emoji benchmark, built from fonts (``emoji_fonts``);
- ``image_folder``: your own images, one folder per class;
- ``fashion_mnist``: Zalando's Fashion-MNIST, for closed-set classification;
- ``long_tail``: long-tailed subsets of a training set, for imbalanced classification;
- the paper benchmarks in their official layouts, each loader returning a ``FileList``
  (``file_list``: image files, labels and splits, decoded on request): ``cub``
  (CUB-200-2011), ``cars196``, ``sop`` (Stanford Online Products), ``inshop`` (In-Shop
  Clothes); ``layouts`` writes small datasets in those layouts;
- ``by_name``: ``load_dataset``, what a notebook's ``DATASET`` parameter calls: a built-in
  name or the path of your own ImageFolder tree, with built data kept in a cache folder.
"""

from utils_cv.similarity.datasets.base import (
    DATA_DIR,
    SPLITS,
    ImageData,
    class_split,
    cross_domain_pair,
    cross_domain_views,
    example_queries,
    split_summary,
    to_rgb,
)
from utils_cv.similarity.datasets.by_name import BUILT_IN, cache_dir, load_dataset
from utils_cv.similarity.datasets.cars196 import load_cars196
from utils_cv.similarity.datasets.cub import load_cub
from utils_cv.similarity.datasets.emoji import load_emoji
from utils_cv.similarity.datasets.fashion_mnist import load_fashion_mnist
from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.datasets.image_folder import load_image_folder
from utils_cv.similarity.datasets.inshop import load_inshop
from utils_cv.similarity.datasets.layouts import (
    write_cars196_layout,
    write_cub_layout,
    write_inshop_layout,
    write_sop_layout,
)
from utils_cv.similarity.datasets.long_tail import long_tail_counts, long_tailed
from utils_cv.similarity.datasets.sop import load_sop

__all__ = [
    "BUILT_IN",
    "cache_dir",
    "load_dataset",
    "DATA_DIR",
    "SPLITS",
    "FileList",
    "ImageData",
    "class_split",
    "cross_domain_pair",
    "cross_domain_views",
    "example_queries",
    "load_cars196",
    "load_cub",
    "load_emoji",
    "load_fashion_mnist",
    "load_image_folder",
    "load_inshop",
    "load_sop",
    "long_tail_counts",
    "long_tailed",
    "split_summary",
    "to_rgb",
    "write_cars196_layout",
    "write_cub_layout",
    "write_inshop_layout",
    "write_sop_layout",
]
