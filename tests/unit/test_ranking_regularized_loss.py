"""RankingRegularizedLoss: cross-entropy plus lambda times a triplet loss, by hand and by parts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils_cv.similarity.callbacks import _flat_numbers
from utils_cv.similarity.losses import RankingRegularizedLoss, TripletLoss
from utils_cv.similarity.models import TwoHeadNet

WEIGHTS = [0.0, 0.5, 1.0, 2.0]
MININGS = ["semi_hard", "batch_hard"]


def paper_triplet(mining: str) -> TripletLoss:
    """The paper's ranking loss: margin 0.2 on squared distances."""
    return TripletLoss(0.2, mining=mining, squared=True)


def batch(seed: int = 0, classes: int = 4, per_class: int = 3, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    n = classes * per_class
    logits = torch.randn(n, classes, generator=generator, requires_grad=True)
    embeddings = F.normalize(torch.randn(n, dim, generator=generator), dim=1).requires_grad_()
    labels = torch.arange(classes).repeat_interleave(per_class)
    return logits, embeddings, labels


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("mining", MININGS)
def test_the_loss_is_cross_entropy_plus_weight_times_the_triplet_loss(weight, mining):
    logits, embeddings, labels = batch()
    loss = RankingRegularizedLoss(4, paper_triplet(mining), weight=weight)
    value = loss({"logits": logits, "embeddings": embeddings}, labels)
    cross_entropy = F.cross_entropy(logits, labels)
    triplet = paper_triplet(mining)(embeddings, labels)
    assert triplet > 0  # else the weight would not show
    torch.testing.assert_close(value, cross_entropy + weight * triplet)
    # And the gradients: the logits get the cross-entropy's, the embeddings weight x triplet's.
    value.backward()
    expected_logits = torch.autograd.grad(cross_entropy, logits)[0]
    expected_embeddings = torch.autograd.grad(triplet, embeddings)[0] * weight
    torch.testing.assert_close(logits.grad, expected_logits)
    if weight == 0:
        assert embeddings.grad is None  # no triplet in the graph at all
    else:
        torch.testing.assert_close(embeddings.grad, expected_embeddings)
        assert embeddings.grad.abs().sum() > 0


def test_weight_zero_is_plain_cross_entropy_exactly_even_on_batches_without_pairs():
    logits, embeddings, _ = batch()
    labels = torch.arange(12) % 4  # shuffled-looking batch
    outputs = {"logits": logits, "embeddings": embeddings}
    value = RankingRegularizedLoss(4, paper_triplet("batch_hard"), weight=0)(outputs, labels)
    assert torch.equal(value, F.cross_entropy(logits, labels))
    # A batch where no two images share a class: no triplet exists, cross-entropy still does.
    distinct = {"logits": logits[:4], "embeddings": embeddings[:4]}
    loss = RankingRegularizedLoss(4, paper_triplet("batch_hard"), weight=0)
    assert torch.equal(loss(distinct, labels[:4]), F.cross_entropy(logits[:4], labels[:4]))
    assert set(loss.stats) == {"cross_entropy", "accuracy"}
    with pytest.raises(ValueError, match="no positive pair"):
        RankingRegularizedLoss(4, paper_triplet("batch_hard"), weight=1)(distinct, labels[:4])


# Four points on a line, two classes: x = 0, 1 (class 0) and 3, 7 (class 1), zero logits.
# Squared distances; batch-hard, margin 0.2, for each anchor (hardest positive, negative):
#   x=0: (1, 9) -> 0;  x=1: (1, 4) -> 0;  x=3: (16, 4) -> 12.2;  x=7: (16, 36) -> 0
# Triplet = 12.2 / 4 = 3.05, one of four anchors active. Cross-entropy of zero logits over two
# classes = log 2; argmax picks class 0 everywhere, so accuracy = 1/2.
LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
LINE_LABELS = torch.tensor([0, 0, 1, 1])


def test_value_and_stats_by_hand():
    loss = RankingRegularizedLoss(2, paper_triplet("batch_hard"), weight=0.5)
    value = loss({"logits": torch.zeros(4, 2), "embeddings": LINE}, LINE_LABELS)
    assert value.item() == pytest.approx(math.log(2) + 0.5 * 3.05)
    assert loss.stats == pytest.approx(
        {
            "cross_entropy": math.log(2),
            "triplet": 3.05,  # before weighting
            "accuracy": 0.5,
            "active_fraction": 0.25,
            "num_triplets": 4.0,
            "mean_pos_distance": (1 + 1 + 16 + 16) / 4,
            "mean_neg_distance": (9 + 49 + 4 + 36) / 4,
        }
    )
    assert all(isinstance(v, float) for v in loss.stats.values())
    # The training code's history reads every one of them as a number.
    assert dict(_flat_numbers(loss.stats)) == loss.stats


def test_accuracy_is_the_top1_of_the_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    outputs = {"logits": logits, "embeddings": torch.tensor([[0.0], [1.0], [2.0], [9.0]])}
    loss = RankingRegularizedLoss(3, paper_triplet("semi_hard"))
    # argmax = 0, 1, 2, 0
    loss(outputs, torch.tensor([0, 1, 1, 0]))  # right, right, wrong, right
    assert loss.stats["accuracy"] == 0.75
    loss(outputs, torch.tensor([0, 0, 2, 2]))  # right, wrong, right, wrong
    assert loss.stats["accuracy"] == 0.5


def test_gradients_reach_both_heads_and_the_triplet_reaches_the_backbone():
    torch.manual_seed(0)
    model = TwoHeadNet("small_cnn", num_classes=3, image_size=16, embedding_size=8)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    grads = {}
    for weight in (0.0, 1.0):
        model.zero_grad(set_to_none=True)
        loss = RankingRegularizedLoss(3, paper_triplet("batch_hard"), weight=weight)
        loss(model.training_outputs(images), labels).backward()
        grads[weight] = {name: p.grad for name, p in model.named_parameters()}
    for name in ("classifier.weight", "embedding_layer.weight", "backbone.0.weight"):
        assert grads[1.0][name] is not None and grads[1.0][name].abs().sum() > 0, name
    # The classifier's gradient is the cross-entropy's alone; the backbone's gains the triplet's.
    torch.testing.assert_close(grads[1.0]["classifier.weight"], grads[0.0]["classifier.weight"])
    assert grads[0.0]["embedding_layer.weight"] is None
    assert not torch.allclose(grads[1.0]["backbone.0.weight"], grads[0.0]["backbone.0.weight"])


def test_errors_say_what_to_change():
    triplet = paper_triplet("batch_hard")
    for weight in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"weight={weight} must be a finite number >= 0"):
            RankingRegularizedLoss(3, triplet, weight=weight)
    with pytest.raises(ValueError, match="num_classes=0"):
        RankingRegularizedLoss(0, triplet)
    with pytest.raises(TypeError, match="loss module"):
        RankingRegularizedLoss(3, "batch_hard")
    loss = RankingRegularizedLoss(3, triplet)
    logits, embeddings, labels = torch.zeros(4, 3), LINE, LINE_LABELS
    with pytest.raises(ValueError, match="'logits' and 'embeddings', got Tensor"):
        loss(embeddings, labels)
    with pytest.raises(ValueError, match=r"got \['logits'\]"):
        loss({"logits": logits}, labels)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(N, 3\).*num_classes"):
        loss({"logits": torch.zeros(4, 2), "embeddings": embeddings}, labels)
    with pytest.raises(ValueError, match=r"embeddings \(3, 1\) must be \(N, D\) with N=4"):
        loss({"logits": logits, "embeddings": embeddings[:3]}, labels)
    with pytest.raises(ValueError, match="N > 0"):
        loss({"logits": logits[:0], "embeddings": embeddings[:0]}, labels[:0])
    with pytest.raises(ValueError, match="labels range from 0 to 3 but num_classes=3"):
        loss({"logits": logits, "embeddings": embeddings}, torch.tensor([0, 0, 3, 3]))
