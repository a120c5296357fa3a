"""Your catalogue as a search service: index a dataset's images once, query it with image files.

    index = index_images(model, data, image_size=64, kind="hnsw")
    index.save("catalogue_index")                 # later, in another process:
    index = EmbeddingIndex.load("catalogue_index")
    search_images(model, index, ["my_photo.jpg"], k=5)

A query file is loaded as the datasets load theirs (`datasets.base.to_rgb`: EXIF orientation
applied, transparency composited onto white, 16-bit and CMYK converted; the shorter side
resized to the index's image size, then the centre cropped), embedded by `models.embed` and
searched with the model's identity, so an index refuses queries from another model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from utils_cv.similarity.datasets.base import WHITE, ImageData, _resize_square, _to_tensor
from utils_cv.similarity.index import EmbeddingIndex, model_identity
from utils_cv.similarity.models import embed


def index_images(
    model: torch.nn.Module,
    data: ImageData,
    image_size: int,
    kind: str = "flat",
    name: str | None = None,
    device=None,
    **index_options,
) -> EmbeddingIndex:
    """Embed every image of `data` and index them with their labels (class names) and paths.

    Args:
        model: the embedding model (images (N, 3, H, W) in [0, 1] -> (N, D)).
        data: the catalogue; its images must already be `image_size` pixels square.
        image_size: the size queries are resized to, stored in the index's model identity.
        kind, index_options: see `EmbeddingIndex`; the metric is "cosine" unless given.
        name: the model's name in its identity.
        device: where to embed (`models.embed`).
    """
    if tuple(data.images.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"the catalogue's images are {tuple(data.images.shape[2:])} but image_size="
            f"{image_size}; load the data at the size the model embeds"
        )
    embeddings = embed(model, data.images, device=device)
    index = EmbeddingIndex(
        embeddings.shape[1], kind, model=model_identity(model, image_size, name), **index_options
    )
    labels = [data.class_names[i] for i in data.labels.tolist()]
    return index.add(embeddings, labels=labels, paths=data.paths)


def load_query_images(
    paths: Sequence[str | os.PathLike], image_size: int, background=WHITE
) -> torch.Tensor:
    """(N, 3, image_size, image_size) uint8 from image files, as the datasets load images."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(_resize_square(image, image_size, background))
        except FileNotFoundError:
            raise FileNotFoundError(f"query image {path} does not exist; check the path") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"query image {path} cannot be read as an image ({error}); pass a JPEG, PNG, "
                "or another format Pillow opens"
            ) from None
    return _to_tensor(images)


def query_image_size(index: EmbeddingIndex) -> int:
    """The size query images are loaded at for ``index``: its model's, which it must know."""
    if index.model is None:
        raise ValueError(
            "this index does not say which model made it, so image files cannot be embedded "
            "for it; build it with index_images or EmbeddingIndex(..., model=model_identity(...))"
        )
    return index.model["image_size"]


def query_embeddings(
    model: torch.nn.Module, index: EmbeddingIndex, images: torch.Tensor, device=None
) -> tuple[torch.Tensor, dict]:
    """Embeddings of query images loaded at ``query_image_size(index)``, and ``model``'s
    identity, which ``index`` checks against its own when searching them."""
    identity = model_identity(model, query_image_size(index), index.model["name"])
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
    index must know its model (`index_images` stores it): the query images are resized to
    its image size and embedded by `model`, which must be that model (same weights).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    images = load_query_images(paths, query_image_size(index))
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
