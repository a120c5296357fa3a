"""Embedding models: a backbone, pooling, optional LayerNorm and linear layer, L2 norm.

Models take float images (N, 3, H, W) in [0, 1] and normalize them inside, so data never
needs a separate normalization step. ``embed`` turns any such model into embeddings for
a whole image tensor.

**The model contract.** ``model(x)`` always returns the retrieval embedding, (N, D): it is
what ``embed``, the evaluation and the rank plots use, in training and at test time alike.
A model that needs to give the loss more than that during training (two heads, say: class
logits from pooled features and an embedding from the flattened conv map) also defines

    training_outputs(x) -> dict[str, Tensor]   # e.g. {"logits": (N, C), "embeddings": (N, D)}

The training code (``training.ModelWithLoss``) calls ``training_outputs`` instead of
``forward`` while training, when the model has it, and hands the dict to the loss as its
first argument: ``loss(outputs, labels)``. Models without it train as
``loss(model(x), labels)``. Nothing else changes: evaluation never sees the dict.

The backbones, their input normalization, ImageNet weights offline and the stages that
fine-tuning freezes are in ``backbones``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from utils_cv.similarity.backbones import (
    create_backbone,
    freeze_stages,
    register_input_mean_std,
)
from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.file_loader import FileDataLoader

POOLINGS = ("avg", "max", "avgmax")


class EmbeddingNet(nn.Module):
    """Backbone, global pooling, optional LayerNorm and linear layer, optional L2 norm.

    Args:
        backbone: a name accepted by ``create_backbone``.
        embedding_size: output size D; None keeps the backbone's channel count C. A
            bias-free linear layer maps C to D only when D differs from C.
        pooling: "avg", "max", or "avgmax" (the sum of both, as in Proxy-Anchor's code).
        layer_norm: LayerNorm without affine parameters right after pooling (NormSoftmax):
            each pooled vector gets zero mean and unit variance.
        normalize: L2-normalize the output, so that embeddings lie on the unit sphere.
        weights: pretrained weights for the backbone (see ``create_backbone``).
        frozen_stages: how many of the backbone's first stages (``backbone_stages``) stay
            as they are: their parameters get no gradient and their BatchNorm layers stay in
            eval mode (running statistics fixed), whatever ``train()`` says. The early
            stages of a pretrained network hold generic edges and textures and run at the
            highest resolution: freezing them saves their backward pass, most of the cost of
            fine-tuning on a CPU. 0 trains everything; all of them train only what follows
            the backbone.

    Input: (N, 3, H, W) float in [0, 1]. Output: (N, D) float.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        embedding_size: int | None = None,
        pooling: str = "avg",
        layer_norm: bool = False,
        normalize: bool = True,
        weights=None,
        frozen_stages: int = 0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is unknown; use one of {POOLINGS}")
        self.backbone, channels = create_backbone(backbone, weights)
        self.frozen_stages = frozen_stages
        self._frozen = freeze_stages(self.backbone, frozen_stages, backbone)
        self.pooling = pooling
        self.normalize = normalize
        self.embedding_size = channels if embedding_size is None else embedding_size
        self.layer_norm = nn.LayerNorm(channels, elementwise_affine=False) if layer_norm else None
        self.linear = (
            nn.Linear(channels, self.embedding_size, bias=False)
            if self.embedding_size != channels
            else None
        )
        register_input_mean_std(self, backbone)
        self.train()

    def train(self, mode: bool = True) -> EmbeddingNet:
        """As ``nn.Module.train``, but the frozen stages stay in eval mode."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1] -> (N, C, h, w) convolutional feature map."""
        return self.backbone((x - self.mean) / self.std)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map: (N, C, h, w) -> (N, C)."""
        if self.pooling == "avg":
            return feature_map.mean(dim=(2, 3))
        if self.pooling == "max":
            return feature_map.amax(dim=(2, 3))
        return feature_map.mean(dim=(2, 3)) + feature_map.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1] -> (N, D) embeddings."""
        embeddings = self.pool(self.features(x))
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        if self.linear is not None:
            embeddings = self.linear(embeddings)
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        return embeddings


class TwoHeadNet(nn.Module):
    """One backbone, two heads: a classifier and a ranking embedding (Taha et al., 2020).

    "Boosting Standard Classification Architectures Through a Ranking Regularizer" (WACV
    2020) trains a classifier with a second head that a triplet loss ranks:

    - head 1, classification: global average pooling of the final conv map, then a linear
      layer with bias to the class logits (the network's usual classifier);
    - head 2, ranking: the final conv map *flattened* (not pooled), then a linear layer
      with bias to ``embedding_size`` (256 in the paper), then L2 normalization.

    Flattening keeps where in the image a feature fired, which pooling discards, at a
    price in parameters: C * h * w * D + D. At 224 px a ResNet-50's map is 7 x 7 x 2048, so
    that layer has 7 * 7 * 2048 * 256 + 256 = 25,690,368 parameters (about 25.7M, more than
    the 23.5M of the backbone itself). The map's size depends on the input resolution, so
    it is fixed at construction (one dummy image through the backbone, ``map_shape``) from
    ``image_size``, and inputs of another size are refused. At small sizes a ResNet's map
    is 1 x 1 (32 px) or 2 x 2 (64 px): there flattening and pooling see almost the same.

    The reference code (TF-slim ResNet-v2, pre-activation) flattens the output of the last
    residual unit, taken *before* the network's final BatchNorm + ReLU, which only the
    pooled head sees; that map is a raw residual sum, of either sign. torchvision's ResNet
    is v1 (post-activation): its last block ends with a ReLU after the residual addition
    and there is no final BatchNorm. Here both heads therefore read the same map, and the
    flattened map is non-negative (small_cnn's too, which ends in ReLU).

    Args:
        backbone: a name accepted by ``create_backbone``.
        num_classes: C, the width of the logits; training labels must lie in 0..C-1.
        image_size: the input size the model is built for: an int for square images or
            (height, width).
        embedding_size: D, the size of the ranking embedding.
        weights: pretrained weights for the backbone (see ``create_backbone``).
        frozen_stages: the first stages of the backbone that stay as they are, as in
            ``EmbeddingNet``.

    ``model(x)`` is the ranking embedding (the retrieval embedding of the model contract);
    ``training_outputs(x)`` gives both heads from one backbone pass; ``logits(x)`` and
    ``pooled(x)`` the classifier's output and its input, the pooled features. To embed
    a whole image tensor through one of those, wrap it: ``embed(ModelOutput(model,
    "pooled"), images)``.

    Input: (N, 3, H, W) float in [0, 1], with (H, W) = ``image_size``.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        num_classes: int,
        image_size: int | tuple[int, int],
        embedding_size: int = 256,
        weights=None,
        frozen_stages: int = 0,
    ):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"num_classes={num_classes} and embedding_size={embedding_size} must be positive"
            )
        self.image_size = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size)
        self.backbone, channels = create_backbone(backbone, weights)
        self.frozen_stages = frozen_stages
        self._frozen = freeze_stages(self.backbone, frozen_stages, backbone)
        register_input_mean_std(self, backbone)
        # Eval mode for the dummy image: BatchNorm must neither update its running
        # statistics nor fail on a 1 x 1 map of one image.
        self.backbone.eval()
        with torch.no_grad():
            self.map_shape = tuple(self.features(torch.zeros(1, 3, *self.image_size)).shape[1:])
        self.backbone.train()
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.classifier = nn.Linear(channels, num_classes)
        self.embedding_layer = nn.Linear(math.prod(self.map_shape), embedding_size)
        self.train()

    def train(self, mode: bool = True) -> TwoHeadNet:
        """As ``nn.Module.train``, but the frozen stages stay in eval mode."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1] -> (N, C, h, w) convolutional feature map."""
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(x.shape[2:])} pixels but the model was built for "
                f"image_size={self.image_size}: the ranking head's input size depends on it; "
                "resize the images or build the model with their size"
            )
        return self.backbone((x - self.mean) / self.std)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map: (N, C, h, w) -> (N, C), global average pooling."""
        return feature_map.mean(dim=(2, 3))

    def _ranking_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map: (N, C, h, w) -> (N, D) L2-normalized ranking embeddings."""
        return F.normalize(self.embedding_layer(feature_map.flatten(1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1] -> (N, D) ranking embeddings (unit vectors)."""
        return self._ranking_head(self.features(x))

    def training_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x -> {"logits": (N, num_classes), "embeddings": (N, D)}, one backbone pass."""
        feature_map = self.features(x)
        return {
            "logits": self.classifier(self.pool(feature_map)),
            "embeddings": self._ranking_head(feature_map),
        }

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """x -> (N, C) pooled features, the classifier's input (not normalized)."""
        return self.pool(self.features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x -> (N, num_classes) class logits."""
        return self.classifier(self.pooled(x))


class ModelOutput(nn.Module):
    """Another output of a model as a model of its own, for ``embed`` and the plots.

    ``ModelOutput(model, "pooled")(x)`` is ``model.pooled(x)``. The wrapped model is
    shared, not copied: ``embed(ModelOutput(model, "pooled"), images)`` gives the pooled
    features of all images (L2-normalized; pass ``normalize=False`` for the raw values,
    as for ``"logits"``).
    """

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise ValueError(f"{type(model).__name__} has no method {method!r}")
        self.model = model
        self.method = method
        self.train(model.training)  # `embed` restores this mode on the wrapped model too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


@torch.no_grad()
def embed(
    model: nn.Module,
    images: torch.Tensor | FileList,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    normalize: bool = True,
    *,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> torch.Tensor:
    """Embeddings of many images, computed in batches in eval mode without gradients.

    Args:
        model: maps (B, 3, H, W) float in [0, 1] to (B, D), or to a larger tensor that is
            flattened to (B, D) (for example a conv map or raw pixels).
        images: (N, 3, H, W) uint8 (divided by 255 here) or float in [0, 1], on any device;
            or a ``FileList``, whose files are decoded batch by batch in ``num_workers``
            processes (``file_loader.FileDataLoader``) at ``image_size``, exactly as
            ``FileList.load(image_size)`` would load them.
        batch_size: images per forward pass.
        device: where to compute; None uses the model's device. The model is moved there
            for the call and moved back afterwards.
        normalize: L2-normalize each embedding. Pass False to keep the model's raw outputs,
            for example to binarize LayerNorm outputs at zero.
        image_size: a FileList's image side (required for one); for a tensor None or its
            own size.
        num_workers: a FileList's decoding processes (0: in this process; None: one per
            core, at most 8); a tensor needs none.

    Returns:
        (N, D) float32 on the CPU. The model's train/eval mode and device are restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    model_device = _module_device(model)
    device = model_device if device is None else torch.device(device)
    batches = _batches(images, batch_size, image_size, num_workers, device)
    was_training = model.training
    model.to(device).eval()
    try:
        chunks = []
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
            out = model(batch).flatten(1).float()
            if normalize:
                out = F.normalize(out, dim=1)
            chunks.append(out.cpu())
    finally:
        model.to(model_device).train(was_training)
    return torch.cat(chunks)


def _batches(
    images: torch.Tensor | FileList,
    batch_size: int,
    image_size: int | None,
    num_workers: int | None,
    device: torch.device,
) -> Iterable[torch.Tensor]:
    """``embed``'s batches of a tensor (slices) or of a FileList (decoded), checked."""
    if isinstance(images, FileList):
        if image_size is None:
            raise ValueError(
                "images is a FileList: pass image_size, the side its images are resized and "
                "cropped to (the size the model was trained at, e.g. image_size=224)"
            )
        if len(images) == 0:
            raise ValueError("the FileList is empty; embed needs at least one image")
        loader = FileDataLoader(
            images, image_size, batch_size, num_workers=num_workers, device=device
        )
        return (batch for batch, _ in loader)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor or a FileList, got {type(images).__name__}")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be (N, 3, H, W) with N > 0, got shape {tuple(images.shape)}")
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"image_size={image_size} but the images are {tuple(images.shape[-2:])}; "
            "image_size is for a FileList, leave it out for a tensor"
        )
    return (images[start : start + batch_size] for start in range(0, len(images), batch_size))


def _module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU for a stateless model."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
