"""TwoHeadNet (the ranking regularizer's model) and one tiny end-to-end training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils_cv.common.device import set_seed
from utils_cv.similarity.backbones import IMAGENET_MEAN, IMAGENET_STD
from utils_cv.similarity.datasets import ImageData
from utils_cv.similarity.losses import RankingRegularizedLoss, TripletLoss
from utils_cv.similarity.models import ModelOutput, TwoHeadNet, embed
from utils_cv.similarity.runner import train_run

# backbone, image_size, and the final conv map (channels, h, w) that size gives.
MAPS = [
    ("small_cnn", 32, (256, 4, 4)),
    ("small_cnn", 48, (256, 6, 6)),
    ("small_cnn", (32, 48), (256, 4, 6)),
    ("resnet18", 32, (512, 1, 1)),
    ("resnet18", 64, (512, 2, 2)),
]


def two_head(backbone="small_cnn", image_size=32, num_classes=5, embedding_size=16):
    return TwoHeadNet(
        backbone, num_classes=num_classes, image_size=image_size, embedding_size=embedding_size
    )


def images_of(image_size, n=4):
    size = (image_size,) * 2 if isinstance(image_size, int) else image_size
    return torch.rand(n, 3, *size)


@pytest.mark.parametrize(("backbone", "image_size", "map_shape"), MAPS)
def test_both_heads_have_the_documented_shapes_and_parameter_counts(
    backbone, image_size, map_shape
):
    set_seed(0)
    model = two_head(backbone, image_size, num_classes=7, embedding_size=16).eval()
    x = images_of(image_size)
    with torch.no_grad():
        outputs = model.training_outputs(x)
        pooled = model.pooled(x)
    channels, h, w = map_shape
    assert model.map_shape == map_shape
    assert outputs["logits"].shape == (4, 7) and outputs["embeddings"].shape == (4, 16)
    assert pooled.shape == (4, channels)
    # Head 2 is one linear layer with bias on the flattened map: C * h * w * D + D.
    head = model.embedding_layer
    assert head.weight.shape == (16, channels * h * w) and head.bias.shape == (16,)
    assert sum(p.numel() for p in head.parameters()) == channels * h * w * 16 + 16
    # Head 1 is one linear layer with bias on the C pooled channels.
    assert sum(p.numel() for p in model.classifier.parameters()) == channels * 7 + 7
    assert isinstance(model.backbone, nn.Module)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not backbone_ids & {id(p) for p in (*head.parameters(), *model.classifier.parameters())}


def test_the_resnet50_ranking_head_at_224_px_has_25_7_million_parameters():
    model = TwoHeadNet("resnet50", num_classes=10, image_size=224)
    assert model.map_shape == (2048, 7, 7)
    assert sum(p.numel() for p in model.embedding_layer.parameters()) == 25_690_368


@pytest.mark.parametrize("training", [False, True])
def test_forward_is_the_ranking_head_and_unit_length(training):
    set_seed(0)
    model = two_head().train(training)
    x = images_of(32, n=6)
    # In training mode BatchNorm uses the batch's statistics: the same batch, the same result.
    embeddings = model(x)
    outputs = model.training_outputs(x)
    torch.testing.assert_close(embeddings, outputs["embeddings"])
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(6))
    feature_map = model.features(x)
    torch.testing.assert_close(
        embeddings, F.normalize(model.embedding_layer(feature_map.flatten(1)), dim=1)
    )
    torch.testing.assert_close(outputs["logits"], model.classifier(feature_map.mean(dim=(2, 3))))
    torch.testing.assert_close(model.logits(x), outputs["logits"])
    torch.testing.assert_close(model.pooled(x), feature_map.mean(dim=(2, 3)))


def test_training_outputs_run_the_backbone_once():
    model = two_head()
    calls = []
    handle = model.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.training_outputs(images_of(32))
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_inputs_in_0_1_are_normalized_inside_and_the_map_is_non_negative(backbone):
    set_seed(0)
    model = two_head(backbone).eval()
    x = images_of(32)
    with torch.no_grad():
        expected = model.backbone((x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                                  / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))  # fmt: skip
        feature_map = model.features(x)
    torch.testing.assert_close(feature_map, expected)
    # torchvision's ResNet (v1) and small_cnn both end in ReLU, unlike the reference's map.
    assert feature_map.min() >= 0 and feature_map.max() > 0


def test_building_the_model_leaves_batchnorm_untouched_and_in_training_mode():
    model = two_head("resnet18")
    assert model.training and all(m.training for m in model.modules())
    for module in model.backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_batches_tracked == 0
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))


def test_images_of_another_size_and_bad_sizes_are_refused():
    model = two_head(image_size=32)
    with pytest.raises(ValueError, match=r"\(48, 48\) pixels.*image_size=\(32, 32\)"):
        model(images_of(48))
    with pytest.raises(ValueError, match="num_classes=0"):
        two_head(num_classes=0)


def test_model_output_embeds_the_pooled_features_or_the_logits():
    set_seed(0)
    model = two_head()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        pooled = model.eval().pooled(images.float() / 255)
        logits = model.logits(images.float() / 255)
    torch.testing.assert_close(embed(ModelOutput(model, "pooled"), images), F.normalize(pooled))
    torch.testing.assert_close(embed(ModelOutput(model, "logits"), images, normalize=False), logits)
    assert embed(model, images).shape == (5, 16)  # the model itself: the ranking head
    assert not model.training  # embedding through the wrapper keeps the model's mode
    model.train()
    embed(ModelOutput(model, "pooled"), images)
    assert model.training
    with pytest.raises(ValueError, match="no method 'pool_features'"):
        ModelOutput(model, "pool_features")


# --- the contract end to end ---------------------------------------------------------------


def random_images(seed: int, num_classes: int = 5, per_class: int = 8) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    return ImageData(
        images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
        labels=torch.arange(num_classes).repeat_interleave(per_class),
        class_names=[f"class{i}" for i in range(num_classes)],
        splits=["train"] * n,
        domains=[""] * n,
        paths=[""] * n,
    )


def test_a_two_head_model_trains_with_the_ranking_regularizer_through_train_run():
    train, test = random_images(0), random_images(1, per_class=2)
    set_seed(0)
    before = {name: p.detach().clone() for name, p in two_head().named_parameters()}
    run = train_run(
        two_head,
        lambda: RankingRegularizedLoss(5, TripletLoss(0.2, mining="batch_hard", squared=True)),
        train, test=test, epochs=2, frozen_epochs=1, lr=1e-2, seed=0,
        classes_per_batch=4, samples_per_class=2, device="cpu",
    )  # fmt: skip
    after = dict(run.model.named_parameters())
    for name in ("classifier.weight", "embedding_layer.weight", "backbone.0.weight"):
        assert not torch.equal(before[name], after[name].detach()), name
    # Evaluation embedded the test images through forward: the ranking head.
    model = run.model.eval()
    with torch.no_grad():
        feature_map = model.features(test.images.float() / 255)
        ranking = F.normalize(model.embedding_layer(feature_map.flatten(1)), dim=1)
    assert run.embeddings.shape == (10, 16)
    torch.testing.assert_close(run.embeddings, ranking)
    for entry in run.history:
        assert entry["loss_cross_entropy"] > 0 and entry["loss_triplet"] >= 0
        assert 0 <= entry["loss_accuracy"] <= 1
        assert 0 <= entry["loss_active_fraction"] <= 1
    assert run.summary()["final_active_fraction"] == run.history[-1]["loss_active_fraction"]
