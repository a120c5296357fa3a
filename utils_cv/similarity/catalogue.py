"""Your catalogue as a search service: index a dataset's images once, query it with image files.

    index = index_images(model, data, image_size=64, kind="hnsw")  # ImageData or FileList
    index.save("catalogue_index")                 # later, in another process:
    index = EmbeddingIndex.load("catalogue_index")
    search_images(model, index, ["my_photo.jpg"], k=5)

The catalogue is an `ImageData` in memory or a `FileList` decoded batch by batch (one too
large for memory). A query file is loaded as the datasets load theirs (`datasets.base.to_rgb`:
EXIF orientation applied, transparency composited onto white, 16-bit and CMYK converted; the
shorter side resized to the index's image size / crop_pct, then the centre cropped: the
catalogue's own geometry, which the index stores), embedded by `models.embed` and searched
with the model's identity, so an index refuses queries from another model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from utils_cv.similarity.datasets.base import (
    WHITE,
    ImageData,
    _resize_square,
    _to_tensor,
    check_crop_pct,
)
from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.index import EmbeddingIndex, identity_values, model_identity
from utils_cv.similarity.models import embed


def index_images(
    model: torch.nn.Module,
    data: ImageData | FileList,
    image_size: int,
    kind: str = "flat",
    name: str | None = None,
    device=None,
    crop_pct: float | None = None,
    num_workers: int | None = None,
    **index_options,
) -> EmbeddingIndex:
    """Embed every image of `data` and index them with their labels (class names) and paths.

    Args:
        model: the embedding model (images (N, 3, H, W) in [0, 1] -> (N, D)).
        data: the catalogue: an ImageData whose images are already `image_size` pixels
            square, or a FileList, decoded batch by batch at `image_size` and its crop_pct.
        image_size: the size queries are resized to, stored in the index's model identity.
        kind, index_options: see `EmbeddingIndex`; the metric is "cosine" unless given.
        name: the model's name in its identity.
        device: where to embed (`models.embed`).
        crop_pct: the crop queries get, stored in the identity too: for an ImageData the one
            it was loaded with (``FileList.load``; None: 1.0, the whole shorter side); a
            FileList's own by default, and no other.
        num_workers: a FileList's decoding processes (`models.embed`).
    """
    if isinstance(data, FileList):
        if crop_pct is not None and crop_pct != data.crop_pct:
            raise ValueError(
                f"crop_pct={crop_pct} but the FileList crops at {data.crop_pct}; leave crop_pct "
                "out, or index replace(files, crop_pct=...)"
            )
        crop_pct = data.crop_pct
        embeddings = embed(
            model, data, device=device, image_size=image_size, num_workers=num_workers
        )
    else:
        if tuple(data.images.shape[2:]) != (image_size, image_size):
            raise ValueError(
                f"the catalogue's images are {tuple(data.images.shape[2:])} but image_size="
                f"{image_size}; load the data at the size the model embeds"
            )
        embeddings = embed(model, data.images, device=device)
    crop_pct = 1.0 if crop_pct is None else crop_pct
    check_crop_pct(crop_pct)
    identity = model_identity(model, image_size, name, crop_pct)
    index = EmbeddingIndex(embeddings.shape[1], kind, model=identity, **index_options)
    labels = [data.class_names[i] for i in data.labels.tolist()]
    return index.add(embeddings, labels=labels, paths=data.paths)


def load_query_images(
    paths: Sequence[str | os.PathLike], image_size: int, crop_pct: float = 1.0, background=WHITE
) -> torch.Tensor:
    """(N, 3, image_size, image_size) uint8 from image files, as the datasets load images
    (``crop_pct`` as ``FileList.crop_pct``); ``query_geometry(index)`` gives an index's."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(_resize_square(image, image_size, background, crop_pct))
        except FileNotFoundError:
            raise FileNotFoundError(f"query image {path} does not exist; check the path") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"query image {path} cannot be read as an image ({error}); pass a JPEG, PNG, "
                "or another format Pillow opens"
            ) from None
    return _to_tensor(images)


def query_geometry(index: EmbeddingIndex) -> tuple[int, float]:
    """How query images are loaded for ``index``: its catalogue's image size and crop_pct
    (1.0 for an index saved before identities stored it); the index must know its model."""
    if index.model is None:
        raise ValueError(
            "this index does not say which model made it, so image files cannot be embedded "
            "for it; build it with index_images or EmbeddingIndex(..., model=model_identity(...))"
        )
    return index.model["image_size"], identity_values(index.model)["crop_pct"]


def query_embeddings(
    model: torch.nn.Module, index: EmbeddingIndex, images: torch.Tensor, device=None
) -> tuple[torch.Tensor, dict]:
    """Embeddings of query images loaded at ``query_geometry(index)``, and ``model``'s
    identity, which ``index`` checks against its own when searching them."""
    size, crop_pct = query_geometry(index)
    identity = model_identity(model, size, index.model["name"], crop_pct)
    return embed(model, images, device=device), identity


def search_images(
    model: torch.nn.Module,
    index: EmbeddingIndex,
    paths: Sequence[str | os.PathLike],
    k: int = 5,
    device=None,
) -> list[list[dict]]:
    """The k nearest catalogue images of each query file, nearest first.

    Returns one list per query file of {"rank", "id", "distance", "label", "path"}. The
    index must know its model (`index_images` stores it): the query images are loaded at
    its image size and crop (``query_geometry``) and embedded by `model`, which must be
    that model (same weights).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    images = load_query_images(paths, *query_geometry(index))
    embeddings, identity = query_embeddings(model, index, images, device)
    distances, positions = index._search(embeddings, k, identity)
    return [
        [
            {
                "rank": rank + 1,
                "id": int(index.ids[p]),
                "distance": float(d),
                "label": index.labels[p],
                "path": index.paths[p],
            }
            for rank, (d, p) in enumerate(zip(row_distances, row_positions, strict=True))
            if p >= 0
        ]
        for row_distances, row_positions in zip(distances, positions, strict=True)
    ]
