"""NormSoftmaxLoss against pytorch-metric-learning, ProxyNCALoss, a naive loop and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss as PMLNormalizedSoftmaxLoss
from pytorch_metric_learning.reducers import MeanReducer

from utils_cv.similarity.losses import NormSoftmaxLoss, ProxyNCALoss

C, D = 5, 4


def naive_norm_softmax(embeddings, labels, weight, temperature) -> tuple[float, dict[str, float]]:
    """The definitions in NormSoftmaxLoss's docstring, one sample and one class at a time.

    Returns the loss and the stats.
    """

    def cosine(a, b):
        dot = sum(u * v for u, v in zip(a, b, strict=True))
        return dot / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    weight = weight.tolist()
    losses, own, other, correct = [], [], [], 0
    for x, y in zip(embeddings.tolist(), labels.tolist(), strict=True):
        cosines = [cosine(x, w) for w in weight]
        logits = [c / temperature for c in cosines]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_sum - logits[y])
        own.append(cosines[y])
        other.extend(c for z, c in enumerate(cosines) if z != y)
        correct += max(range(len(logits)), key=logits.__getitem__) == y
    stats = {
        "mean_cosine_own": sum(own) / len(own),
        "mean_cosine_other": sum(other) / len(other),
        "accuracy": correct / len(losses),
    }
    return sum(losses) / len(losses), stats


def random_batch(seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` float64 embeddings in D dimensions (norms far from 1), labels covering all C."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(size) % C)[torch.randperm(size, generator=generator)]
    embeddings = 3 * torch.randn(size, D, generator=generator, dtype=torch.float64)
    return embeddings, labels


def make_loss(seed: int = 0, **kwargs) -> NormSoftmaxLoss:
    torch.manual_seed(seed)
    return NormSoftmaxLoss(C, D, **kwargs).double()


def loss_and_gradients(loss, embeddings, labels, weight):
    """The loss, its gradient on the embeddings and on ``weight`` (a parameter of ``loss``)."""
    x = embeddings.clone().requires_grad_()
    value = loss(x, labels)
    value.backward()
    return value, x.grad, weight.grad


# --- Against pytorch-metric-learning ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_matches_pytorch_metric_learning_with_gradients(temperature, seed):
    ours = make_loss(seed, temperature=temperature)
    # PML's default reducer is a MeanReducer too; set it so the mean over the batch is
    # explicit. Its W is (embedding_size, num_classes), normalized along dim 0: our weight.T.
    reference = PMLNormalizedSoftmaxLoss(
        num_classes=C, embedding_size=D, temperature=temperature, reducer=MeanReducer()
    ).double()
    assert reference.W.shape == (D, C)
    with torch.no_grad():
        reference.W.copy_(ours.weight.T)
    embeddings, labels = random_batch(seed)

    value, x_grad, w_grad = loss_and_gradients(ours, embeddings, labels, ours.weight)
    expected, x_expected, w_expected = loss_and_gradients(
        reference, embeddings, labels, reference.W
    )
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_grad, x_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_grad, w_expected.T, rtol=1e-10, atol=1e-12)
    assert x_grad.abs().sum() > 0 and w_grad.abs().sum() > 0


def test_pytorch_metric_learning_starts_its_weights_at_std_one():
    # Why the docstring warns about the learning rate: PML's rows are about sqrt(3 D) times
    # longer than ours, so the same step turns them less.
    torch.manual_seed(0)
    reference = PMLNormalizedSoftmaxLoss(num_classes=1000, embedding_size=64)
    ours = NormSoftmaxLoss(num_classes=1000, embedding_size=64)
    assert reference.W.std().item() == pytest.approx(1, abs=0.01)
    ratio = reference.W.norm(dim=0).mean() / ours.weight.norm(dim=1).mean()
    assert ratio.item() == pytest.approx(math.sqrt(3 * 64), rel=0.02)


# --- The definition: a naive loop, F.cross_entropy, the temperature by hand -------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0])
def test_loss_and_stats_match_a_naive_loop(temperature, seed):
    loss = make_loss(seed, temperature=temperature)
    embeddings, labels = random_batch(seed)
    value = loss(embeddings, labels)
    expected, stats = naive_norm_softmax(embeddings, labels, loss.weight.detach(), temperature)
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert loss.stats == pytest.approx(stats, rel=1e-10, abs=1e-10)
    assert all(type(v) is float for v in loss.stats.values())


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_loss_is_cross_entropy_of_cosines_over_the_temperature(temperature):
    loss = make_loss(temperature=temperature)
    embeddings, labels = random_batch(0)
    weight = loss.weight.detach()
    # Cosines the long way: dot products over the product of the lengths.
    dots = (embeddings[:, None, :] * weight[None, :, :]).sum(dim=2)
    lengths = embeddings.norm(dim=1)[:, None] * weight.norm(dim=1)[None, :]
    cosines = dots / lengths
    assert cosines.abs().max() <= 1
    expected = F.cross_entropy(cosines / temperature, labels)
    torch.testing.assert_close(loss(embeddings, labels), expected, rtol=1e-12, atol=1e-12)
    # The weights' lengths do not count, only their directions.
    with torch.no_grad():
        loss.weight.mul_(torch.arange(1, C + 1, dtype=torch.float64)[:, None])
    torch.testing.assert_close(loss(embeddings, labels), expected, rtol=1e-12, atol=1e-12)


def two_class_setup(temperature: float, angle: float, other: list[float]):
    """Class 0's weight along +x, class 1's along ``other``; one embedding at ``angle``."""
    loss = NormSoftmaxLoss(2, 2, temperature=temperature).double()
    with torch.no_grad():  # any lengths: the loss normalizes the rows
        loss.weight.copy_(torch.tensor([[0.3, 0.0], [4 * other[0], 4 * other[1]]]))
    embedding = 5 * torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64)
    return loss, embedding


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("angle", [0.0, 0.4, 2.0])
@pytest.mark.parametrize("other", [[0.0, 1.0], [-1.0, 0.0]], ids=["orthogonal", "opposite"])
def test_two_classes_in_closed_form(other, angle, temperature):
    loss, embedding = two_class_setup(temperature, angle, other)
    cos_own = math.cos(angle)
    cos_other = other[0] * math.cos(angle) + other[1] * math.sin(angle)
    expected = math.log1p(math.exp((cos_other - cos_own) / temperature))
    value = loss(embedding, torch.tensor([0]))
    # log(1 + e^-40) rounds to 0 in float64: hence the absolute tolerance.
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-16)
    assert loss.stats == pytest.approx(
        {
            "mean_cosine_own": cos_own,
            "mean_cosine_other": cos_other,
            "accuracy": float(cos_own > cos_other),  # angle 2 (115 degrees) is misclassified
        }
    )


def test_a_low_temperature_sharpens_the_softmax_and_scales_the_gradient():
    # On its own class's weight, opposite the other: the loss is log(1 + exp(-2 / T)).
    # At T = 1 it cannot go below 0.127; at the paper's 0.05 it is e^-40, 0 in float64.
    warm, embedding = two_class_setup(1.0, 0.0, [-1.0, 0.0])
    cold, _ = two_class_setup(0.05, 0.0, [-1.0, 0.0])
    label = torch.tensor([0])
    assert warm(embedding, label).item() == pytest.approx(math.log1p(math.exp(-2)))
    assert 0 <= cold(embedding, label).item() < 1e-16
    # Where the softmax is flat (equal cosines, p = 1/2), the gradient on the cosines is
    # (p - onehot) / T: 20 times larger at T = 0.05 than at T = 1.
    gradients = []
    for temperature in (1.0, 0.05):
        loss, x = two_class_setup(temperature, math.pi / 4, [0.0, 1.0])
        x.requires_grad_()
        loss(x, label).backward()
        gradients.append(x.grad)
    torch.testing.assert_close(gradients[1], 20 * gradients[0], rtol=1e-12, atol=1e-15)
    assert gradients[0].abs().sum() > 0


# --- The relation to ProxyNCA ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", [0.05, 0.25, 1.0])
def test_equals_proxy_nca_softmax_form_at_scale_one_over_two_temperatures(temperature, seed):
    # ||x - w||^2 = 2 - 2 cos for unit vectors: ProxyNCA's logit -s d = 2 s cos - 2 s is
    # cos / T at s = 1 / (2T), up to a constant that cross-entropy ignores.
    ours = make_loss(seed, temperature=temperature)
    proxy_nca = ProxyNCALoss(C, D, scale=1 / (2 * temperature)).double()
    with torch.no_grad():
        proxy_nca.proxies.copy_(ours.weight)
    embeddings, labels = random_batch(seed)
    value, x_grad, w_grad = loss_and_gradients(ours, embeddings, labels, ours.weight)
    expected, x_expected, w_expected = loss_and_gradients(
        proxy_nca, embeddings, labels, proxy_nca.proxies
    )
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_grad, x_expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_grad, w_expected, rtol=1e-9, atol=1e-12)
    # The stats say the same in the other's units.
    assert ours.stats == pytest.approx(
        {
            "mean_cosine_own": 1 - proxy_nca.stats["mean_pos_distance"] / 2,
            "mean_cosine_other": 1 - proxy_nca.stats["mean_neg_distance"] / 2,
            "accuracy": proxy_nca.stats["proxy_accuracy"],
        },
        rel=1e-10,
        abs=1e-12,
    )
    # The factor 2 matters: scale 1 / T is another loss.
    proxy_nca.scale = 1 / temperature
    assert abs(proxy_nca(embeddings, labels).item() - value.item()) > 1e-3


# --- Initialization and parameters -------------------------------------------------------------


def test_weight_starts_uniform_within_one_over_sqrt_d_and_is_the_only_parameter():
    torch.manual_seed(0)
    loss = NormSoftmaxLoss(num_classes=1000, embedding_size=64)
    assert (loss.num_classes, loss.embedding_size, loss.temperature) == (1000, 64, 0.05)
    assert [name for name, _ in loss.named_parameters()] == ["weight"]
    assert list(loss.parameters()) == [loss.weight]
    assert isinstance(loss.weight, torch.nn.Parameter) and loss.weight.shape == (1000, 64)
    assert loss.weight.dtype == torch.float32
    assert not hasattr(loss, "bias")
    assert list(loss.state_dict()) == ["weight"]
    bound = 1 / 8  # 1 / sqrt(64)
    weight = loss.weight.detach()
    assert weight.abs().max().item() <= bound
    # Uniform: 64,000 draws reach close to both ends, the mean is 0, std bound / sqrt(3).
    assert weight.max().item() > 0.999 * bound and weight.min().item() < -0.999 * bound
    assert weight.mean().item() == pytest.approx(0, abs=0.002)
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    histogram = torch.histc(weight, bins=10, min=-bound, max=bound)
    assert histogram.min() / histogram.max() > 0.9


@pytest.mark.parametrize("embedding_size", [1, 9, 256])
def test_init_bound_follows_the_embedding_size(embedding_size):
    torch.manual_seed(0)
    weight = NormSoftmaxLoss(2000, embedding_size).weight.detach()
    bound = 1 / math.sqrt(embedding_size)
    assert bound * 0.99 < weight.abs().max().item() <= bound


# --- Stats, gradients, precision -------------------------------------------------------------


def test_stats_and_loss_by_hand_on_three_points():
    # Weights along +x, +y, -x (any length: the loss normalizes them).
    loss = NormSoftmaxLoss(3, 2, temperature=0.5)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[0.1, 0.0], [0.0, 5.0], [-2.0, 0.0]]))
    embeddings = torch.tensor([[2.0, 0.0], [1.0, -3.0], [-2.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    s10, s5 = math.sqrt(10), math.sqrt(5)
    cosines = [[1, 0, -1], [1 / s10, -3 / s10, -1 / s10], [-2 / s5, 1 / s5, 2 / s5]]
    value = loss(embeddings, labels)
    expected = sum(
        math.log(sum(math.exp(c / 0.5) for c in row)) - row[y] / 0.5
        for row, y in zip(cosines, labels.tolist(), strict=True)
    )
    assert value.item() == pytest.approx(expected / 3, rel=1e-6)
    assert loss.stats == pytest.approx(
        {
            "mean_cosine_own": (1 - 3 / s10 + 2 / s5) / 3,
            "mean_cosine_other": (0 - 1 + 1 / s10 - 1 / s10 - 2 / s5 + 1 / s5) / 6,
            # The second sample is nearest to class 0's weight, not its own.
            "accuracy": 2 / 3,
        },
        rel=1e-6,
    )
    assert all(type(v) is float for v in loss.stats.values())


def test_stats_are_refreshed_by_every_call():
    loss = make_loss()
    first, second = random_batch(0), random_batch(1)
    loss(*first)
    stats_first = dict(loss.stats)
    loss(*second)
    _, expected = naive_norm_softmax(*second, loss.weight.detach(), loss.temperature)
    assert loss.stats == pytest.approx(expected, rel=1e-10)
    assert loss.stats != stats_first


def test_gradients_reach_the_weights_and_the_embeddings():
    torch.manual_seed(0)
    loss = NormSoftmaxLoss(C, D)
    embeddings = torch.randn(10, D, requires_grad=True)
    loss(embeddings, torch.arange(10) % C).backward()
    assert loss.weight.grad is not None and loss.weight.grad.abs().sum() > 0
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert torch.isfinite(loss.weight.grad).all() and torch.isfinite(embeddings.grad).all()


def test_mixed_precision_computes_the_logits_in_float32():
    loss = make_loss().float()
    embeddings, labels = random_batch(0)
    expected, _ = naive_norm_softmax(embeddings, labels, loss.weight.detach().double(), 0.05)
    plain = loss(embeddings.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(embeddings.float(), labels)
        # bfloat16 embeddings from a layer under autocast are computed in float32 too.
        from_bf16 = loss(embeddings.bfloat16(), labels)
    assert value.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert value.item() == pytest.approx(plain.item(), rel=1e-6)
    # Only the embeddings' own rounding to bfloat16 remains.
    assert from_bf16.item() == pytest.approx(expected, rel=2e-2)


def test_float64_embeddings_are_not_rounded_to_the_weights_float32():
    loss = make_loss().float()
    embeddings, labels = random_batch(0)
    value = loss(embeddings, labels)
    assert value.dtype == torch.float64 and loss.weight.dtype == torch.float32
    expected, _ = naive_norm_softmax(embeddings, labels, loss.weight.detach().double(), 0.05)
    assert value.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_embedding_gives_a_nan_loss(bad):
    embeddings, labels = random_batch(0)
    embeddings[3, 0] = bad
    assert math.isnan(make_loss()(embeddings, labels).item())


# --- Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_label", [-1, C])
def test_labels_out_of_range_are_an_error(bad_label):
    with pytest.raises(ValueError, match=f"{bad_label}.*num_classes={C}.*relabel.*0..C-1"):
        NormSoftmaxLoss(C, D)(torch.randn(2, D), torch.tensor([0, bad_label]))


@pytest.mark.parametrize("shape", [(2, D + 1), (2, 1, D), (2,), (0, D)])
def test_embeddings_of_the_wrong_shape_are_an_error(shape):
    labels = torch.zeros(shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match=rf"\(N, {D}\).*embedding_size"):
        NormSoftmaxLoss(C, D)(torch.randn(shape), labels)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0])])
def test_labels_of_the_wrong_shape_or_type_are_an_error(labels):
    with pytest.raises(ValueError, match=r"\(2,\) integers"):
        NormSoftmaxLoss(C, D)(torch.randn(2, D), labels)


@pytest.mark.parametrize("temperature", [0.0, -0.05, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_and_finite_is_an_error(temperature):
    with pytest.raises(ValueError, match=f"temperature={temperature} must be > 0 and finite"):
        NormSoftmaxLoss(C, D, temperature=temperature)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_fewer_than_two_classes_is_an_error(num_classes):
    with pytest.raises(ValueError, match=f"num_classes={num_classes}.*at least 2 classes"):
        NormSoftmaxLoss(num_classes, D)


@pytest.mark.parametrize("embedding_size", [0, -3])
def test_an_embedding_size_below_one_is_an_error(embedding_size):
    with pytest.raises(ValueError, match=f"embedding_size={embedding_size} must be at least 1"):
        NormSoftmaxLoss(C, embedding_size)
