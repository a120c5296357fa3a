"""Backbones, EmbeddingNet and embed()."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import GoogLeNet_Weights, ResNet18_Weights

from utils_cv.common.device import set_seed
from utils_cv.similarity.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone, weights_file
from utils_cv.similarity.models import EmbeddingNet, embed


@pytest.mark.parametrize(
    ("name", "size", "channels", "map_size"),
    [("small_cnn", 40, 256, 5), ("resnet18", 32, 512, 1), ("resnet50", 32, 2048, 1),
     ("googlenet", 32, 1024, 1), ("googlenet", 224, 1024, 7)],
)  # fmt: skip
def test_backbone_maps_images_to_a_feature_map(name, size, channels, map_size):
    backbone, reported = create_backbone(name)
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, size, size))
    assert reported == channels
    assert out.shape == (2, channels, map_size, map_size)


def test_resnet_backbone_drops_pooling_and_classifier():
    backbone, _ = create_backbone("resnet18")
    kinds = {type(module) for module in backbone.modules()}
    assert nn.AdaptiveAvgPool2d not in kinds
    assert nn.Linear not in kinds


def test_googlenet_computes_what_torchvision_computes_from_imagenet_normalized_images():
    """Our GoogLeNet (inputs scaled to [-1, 1] by INPUT_MEAN_STD, no transform_input, no
    auxiliary heads) gives torchvision's logits: its pretrained form takes ImageNet-normalized
    images and turns them into [-1, 1] itself (transform_input), which a Sequential skips."""
    set_seed(0)
    source = torchvision.models.googlenet(
        weights=None, aux_logits=False, transform_input=True, init_weights=True
    ).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    # BatchNorm statistics of real activations: at torchvision's initialization (and unit
    # running statistics) they shrink to 1e-12 by the last block, and any input compares equal.
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches seen
    with torch.no_grad():
        source.train()((torch.rand(16, 3, 64, 64) - mean) / std)
    source.eval()
    model = EmbeddingNet("googlenet", embedding_size=None, normalize=False).eval()
    model.backbone.load_state_dict(
        {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    )
    images = torch.rand(2, 3, 64, 64)
    pooled = []
    source.avgpool.register_forward_hook(lambda module, inputs, output: pooled.append(output))
    with torch.no_grad():
        logits = source((images - mean) / std)
        ours = model(images)
    assert ours.abs().mean() > 0.1  # activations of a usual size
    torch.testing.assert_close(ours, pooled[0].flatten(1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(source.fc(ours), logits, rtol=1e-4, atol=1e-3)


def test_backbone_errors_name_the_fix():
    with pytest.raises(ValueError, match="resnet18"):
        create_backbone("vgg16")
    with pytest.raises(ValueError, match="weights=None"):
        create_backbone("small_cnn", weights="DEFAULT")


@pytest.mark.parametrize(
    ("backbone", "embedding_size", "expected"),
    [
        ("small_cnn", None, 256),
        ("small_cnn", 64, 64),
        ("resnet18", 512, 512),
        ("resnet18", 128, 128),
    ],
)
def test_embedding_size_and_linear_only_when_sizes_differ(backbone, embedding_size, expected):
    model = EmbeddingNet(backbone, embedding_size=embedding_size).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, expected)
    assert model.embedding_size == expected
    channels = 256 if backbone == "small_cnn" else 512
    if expected == channels:
        assert model.linear is None
    else:
        assert model.linear.weight.shape == (expected, channels)
        assert model.linear.bias is None


def test_output_is_l2_normalized_only_when_asked():
    set_seed(0)
    x = torch.rand(4, 3, 32, 32)
    normalized = EmbeddingNet(embedding_size=16).eval()
    raw = EmbeddingNet(embedding_size=16, normalize=False).eval()
    raw.load_state_dict(normalized.state_dict())
    with torch.no_grad():
        unit, plain = normalized(x), raw(x)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(4))
    assert not torch.allclose(plain.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(unit, plain / plain.norm(dim=1, keepdim=True))


def test_layer_norm_has_no_parameters_and_centres_each_embedding():
    model = EmbeddingNet(layer_norm=True, normalize=False).eval()
    assert list(model.layer_norm.parameters()) == []
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        pooled = model.pool(model.features(x))
    mean, var = pooled.mean(dim=1, keepdim=True), pooled.var(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (pooled - mean) / (var + 1e-5).sqrt())
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)


def test_pooling_variants_on_a_known_map():
    feature_map = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])  # (1, 1, 2, 2): mean 3, max 6
    expected = {"avg": 3.0, "max": 6.0, "avgmax": 9.0}
    for pooling, value in expected.items():
        model = EmbeddingNet(pooling=pooling)
        assert model.pool(feature_map).item() == value
    with pytest.raises(ValueError, match="avgmax"):
        EmbeddingNet(pooling="sum")


def test_model_normalizes_its_input_with_constant_buffers():
    model = EmbeddingNet()
    model.backbone = nn.Identity()
    mean_image = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(model.features(mean_image), torch.zeros(2, 3, 4, 4))
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("training", [True, False])
def test_embed_restores_mode_and_leaves_no_hooks(training):
    model = EmbeddingNet(embedding_size=8).train(training)
    hooks_before = _hook_count(model)
    out = embed(model, torch.rand(5, 3, 16, 16))
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert _hook_count(model) == hooks_before == 0
    assert not out.requires_grad


def test_embed_uses_eval_mode_so_batches_do_not_interact():
    set_seed(0)
    model = EmbeddingNet(embedding_size=8).train()
    images = torch.rand(7, 3, 16, 16)
    # In train mode BatchNorm would use each batch's statistics and the split would matter.
    torch.testing.assert_close(embed(model, images, batch_size=2), embed(model, images))


def test_embed_accepts_uint8_and_float_alike():
    set_seed(0)
    model = EmbeddingNet(embedding_size=8)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    from_uint8 = embed(model, images)
    from_float = embed(model, images.float() / 255)
    assert from_uint8.dtype == torch.float32 and from_uint8.device.type == "cpu"
    torch.testing.assert_close(from_uint8, from_float)


def test_embed_normalize_flag_and_flattening_of_stateless_models():
    images = torch.rand(3, 3, 4, 4)
    raw = embed(nn.Identity(), images, normalize=False)
    torch.testing.assert_close(raw, images.flatten(1))
    unit = embed(nn.Identity(), images)
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True))


def test_embed_rejects_bad_input():
    with pytest.raises(ValueError, match="N > 0"):
        embed(nn.Identity(), torch.rand(0, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        embed(nn.Identity(), torch.rand(3, 4, 4))


TORCHVISION_WEIGHTS = {"resnet18": ResNet18_Weights.IMAGENET1K_V1,
                       "googlenet": GoogLeNet_Weights.IMAGENET1K_V1}  # fmt: skip


@pytest.mark.parametrize("backbone", list(TORCHVISION_WEIGHTS))
def test_weights_that_cannot_be_downloaded_say_where_to_place_the_file(backbone, monkeypatch):
    import torchvision.models._api as torchvision_api

    def offline(url, *args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    weights = TORCHVISION_WEIGHTS[backbone]
    with pytest.raises(RuntimeError, match="Without a network") as error:
        EmbeddingNet(backbone, weights="IMAGENET1K_V1")
    assert str(weights_file(weights)) in str(error.value) and weights.url in str(error.value)


@pytest.mark.parametrize("backbone", list(TORCHVISION_WEIGHTS))
def test_a_weights_file_placed_where_the_message_says_loads_offline(
    backbone, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    set_seed(3)
    # GoogLeNet's file holds its auxiliary classifiers too, as torchvision's does
    options = {"aux_logits": True, "init_weights": True} if backbone == "googlenet" else {}
    source = getattr(torchvision.models, backbone)(**options)
    path = weights_file(TORCHVISION_WEIGHTS[backbone])
    assert path.parent == tmp_path / "checkpoints"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    model = EmbeddingNet(backbone, weights="IMAGENET1K_V1")
    first = source.conv1 if backbone == "resnet18" else source.conv1.conv
    assert torch.equal(next(model.backbone.parameters()), first.weight)
    assert not any("aux" in name for name in model.state_dict())


def test_small_cnn_has_no_weights_and_says_which_backbones_do():
    with pytest.raises(ValueError, match="small_cnn has no pretrained weights.*resnet18"):
        EmbeddingNet("small_cnn", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("embedding_size", [64, None, 256])
def test_normsoftmax_head_is_pooling_layer_norm_linear_then_l2_norm(embedding_size):
    set_seed(0)
    model = EmbeddingNet("small_cnn", embedding_size=embedding_size, layer_norm=True).eval()
    assert list(model.layer_norm.parameters()) == []
    if embedding_size == 64:
        assert model.linear.weight.shape == (64, 256) and model.linear.bias is None
    else:  # the backbone's 256 channels already: no linear layer
        assert model.linear is None
    # What reaches the LayerNorm and what leaves it during model(x).
    seen = {}
    handle = model.layer_norm.register_forward_hook(
        lambda module, inputs, output: seen.update(inputs=inputs[0], output=output)
    )
    x = torch.rand(4, 3, 32, 32)
    try:
        with torch.no_grad():
            out = model(x)
            pooled = model.pool(model.features(x))
    finally:
        handle.remove()
    torch.testing.assert_close(seen["inputs"], pooled)
    normed = seen["output"]
    # Zero mean and unit (biased) variance per row, up to LayerNorm's eps of 1e-5.
    variance = pooled.var(dim=1, unbiased=False)
    torch.testing.assert_close(normed.mean(dim=1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(dim=1, unbiased=False), variance / (variance + 1e-5))
    torch.testing.assert_close(normed.var(dim=1, unbiased=False), torch.ones(4), atol=1e-2, rtol=0)
    with torch.no_grad():
        head = model.layer_norm(pooled) if model.linear is None else model.linear(normed)
        torch.testing.assert_close(out, F.normalize(head, dim=1))
        if model.linear is not None:
            # Another order gives another embedding: LayerNorm after the linear layer, or none.
            after = F.normalize(F.layer_norm(model.linear(pooled), (64,)), dim=1)
            assert not torch.allclose(out, after, atol=1e-3)
            assert not torch.allclose(out, F.normalize(model.linear(pooled), dim=1), atol=1e-3)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
