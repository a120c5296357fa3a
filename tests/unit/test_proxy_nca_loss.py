"""ProxyNCALoss against a naive loop, against pytorch-metric-learning, and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ProxyNCALoss as PMLProxyNCALoss

from utils_cv.similarity.losses import ProxyNCALoss

C, D = 5, 4


def naive_proxy_nca(
    embeddings,
    labels,
    proxies,
    scale,
    include_positive=True,
    proxies_per_class=1,
    proxy_of_class=None,
    eps=0.0,
) -> tuple[float, dict[str, float]]:
    """The definitions in ProxyNCALoss's docstring, one sample and one target at a time.

    The targets are the classes (class c owns proxies c*k .. c*k+k-1 and is as near as the
    nearest of them), or the proxies when ``proxy_of_class`` (a list) makes classes share.
    Returns the loss and the stats.
    """

    def unit(vector):
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector]

    def dist(a, b):
        return sum((u - v) ** 2 for u, v in zip(unit(a), unit(b), strict=True))

    k, proxies = proxies_per_class, proxies.tolist()
    losses, pos, neg, correct = [], [], [], 0
    for x, y in zip(embeddings.tolist(), labels.tolist(), strict=True):
        if proxy_of_class is None:
            num_classes = len(proxies) // k
            d = [min(dist(x, proxies[c * k + j]) for j in range(k)) for c in range(num_classes)]
            target = y
        else:
            d = [dist(x, p) for p in proxies]
            target = proxy_of_class[y]
        logits = [-scale * value for value in d]
        others = [z for z in range(len(d)) if z != target]
        if include_positive:
            top = max(logits)
            log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
            weights = [eps / (len(d) - 1) if z != target else 1 - eps for z in range(len(d))]
            losses.append(-sum(w * (v - log_sum) for w, v in zip(weights, logits, strict=True)))
        else:
            top = max(logits[z] for z in others)
            log_sum = top + math.log(sum(math.exp(logits[z] - top) for z in others))
            losses.append(scale * d[target] + log_sum)
        pos.append(d[target])
        neg.extend(d[z] for z in others)
        correct += min(range(len(d)), key=d.__getitem__) == target
    stats = {
        "mean_pos_distance": sum(pos) / len(pos),
        "mean_neg_distance": sum(neg) / len(neg),
        "proxy_accuracy": correct / len(losses),
    }
    return sum(losses) / len(losses), stats


def random_batch(seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` float64 embeddings in D dimensions with labels covering all C classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(size) % C)[torch.randperm(size, generator=generator)]
    embeddings = torch.randn(size, D, generator=generator, dtype=torch.float64)
    return embeddings, labels


def make_loss(seed: int = 0, **kwargs) -> ProxyNCALoss:
    torch.manual_seed(seed)
    return ProxyNCALoss(C, D, **kwargs).double()


def check_against_naive(loss, seed, **naive_kwargs):
    embeddings, labels = random_batch(seed)
    value = loss(embeddings, labels)
    expected, stats = naive_proxy_nca(
        embeddings,
        labels,
        loss.proxies.detach(),
        loss.scale,
        include_positive=loss.include_positive,
        eps=loss.label_smoothing,
        **naive_kwargs,
    )
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert loss.stats == pytest.approx(stats, rel=1e-10, abs=1e-10)
    assert all(type(v) is float for v in loss.stats.values())


# --- The softmax form against pytorch-metric-learning --------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 9.0])
def test_softmax_form_matches_pytorch_metric_learning_with_gradients(scale, seed):
    ours = make_loss(seed, scale=scale)
    reference = PMLProxyNCALoss(num_classes=C, embedding_size=D, softmax_scale=scale).double()
    # PML's proxies are (num_classes, embedding_size), as ours with one proxy per class.
    assert reference.proxies.shape == ours.proxies.shape
    with torch.no_grad():
        reference.proxies.copy_(ours.proxies)
    embeddings, labels = random_batch(seed)
    # PML drops rows whose target probability underflows to 0; none does here.
    distances = torch.cdist(F.normalize(embeddings), F.normalize(ours.proxies.detach())) ** 2
    log_probs = (-scale * distances).log_softmax(dim=1)
    assert log_probs.gather(1, labels[:, None]).min() > -100

    x_ours = embeddings.clone().requires_grad_()
    x_reference = embeddings.clone().requires_grad_()
    value = ours(x_ours, labels)
    expected = reference(x_reference, labels)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    value.backward()
    expected.backward()
    torch.testing.assert_close(x_ours.grad, x_reference.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ours.proxies.grad, reference.proxies.grad, rtol=1e-8, atol=1e-10)
    assert ours.proxies.grad.abs().sum() > 0


# --- Naive loops: the paper form, several proxies per class, shared proxies -----------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 9.0])
@pytest.mark.parametrize("include_positive", [True, False])
def test_one_proxy_per_class_matches_a_naive_loop(include_positive, scale, seed):
    loss = make_loss(seed, scale=scale, include_positive=include_positive)
    check_against_naive(loss, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("include_positive", [True, False])
def test_two_proxies_per_class_use_the_nearest_like_a_naive_loop(include_positive, seed):
    loss = make_loss(seed, include_positive=include_positive, proxies_per_class=2)
    assert loss.proxies.shape == (2 * C, D) and loss.proxy_of_class is None
    check_against_naive(loss, seed, proxies_per_class=2)
    # Both proxies of a class are the nearest for some sample, so the comparison tells
    # rows c*2, c*2+1 apart from any other layout, and the min from a mean.
    embeddings, labels = random_batch(seed)
    distances = torch.cdist(F.normalize(embeddings), F.normalize(loss.proxies.detach()))
    nearest = distances.view(len(labels), C, 2).argmin(dim=2)
    assert set(nearest[torch.arange(len(labels)), labels].tolist()) == {0, 1}


def test_a_whole_float_number_of_proxies_per_class_is_accepted():
    assert make_loss(proxies_per_class=2.0).proxies.shape == (2 * C, D)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("include_positive", [True, False])
def test_half_a_proxy_per_class_shares_them_statically_like_a_naive_loop(include_positive, seed):
    loss = make_loss(seed, include_positive=include_positive, proxies_per_class=0.5)
    assert loss.num_proxies == 3 and loss.proxies.shape == (3, D)
    assert loss.proxy_of_class.tolist() == [0, 1, 2, 0, 1]
    assert loss.proxy_of_class.dtype == torch.long
    check_against_naive(loss, seed, proxy_of_class=[0, 1, 2, 0, 1])


@pytest.mark.parametrize(
    ("num_classes", "fraction", "num_proxies"),
    [(5, 0.5, 3), (5, 0.6, 3), (25, 0.28, 7), (10, 0.5, 5), (3, 0.9, 3)],
)
def test_number_of_shared_proxies_is_the_ceiling(num_classes, fraction, num_proxies):
    # 25 * 0.28 is 7.000000000000001 in floating point: still 7 proxies, not 8.
    loss = ProxyNCALoss(num_classes, D, proxies_per_class=fraction)
    assert loss.proxies.shape == (num_proxies, D)
    assert loss.proxy_of_class.tolist() == [c % num_proxies for c in range(num_classes)]


# --- The paper form below zero, the scale, label smoothing ----------------------------------


def orthogonal_setup(scale: float, include_positive: bool):
    """Four orthogonal proxies (all 2 apart) and each embedding on its own proxy."""
    loss = ProxyNCALoss(4, 4, scale=scale, include_positive=include_positive)
    with torch.no_grad():
        loss.proxies.copy_(0.1 * torch.eye(4))
    labels = torch.tensor([0, 1, 2, 3, 1])
    embeddings = (3 * torch.eye(4)[labels]).requires_grad_()
    return loss, embeddings, labels


@pytest.mark.parametrize("scale", [9.0, 1000.0])
def test_paper_form_goes_below_zero_where_the_softmax_form_cannot(scale):
    # Positive distance 0, three negatives at 2: the paper form is log(3 exp(-2 scale)),
    # the softmax form log(1 + 3 exp(-2 scale)) > 0. At scale 1000, exp underflows: only a
    # logsumexp gets ln 3 - 2000.
    loss, embeddings, labels = orthogonal_setup(scale, include_positive=False)
    value = loss(embeddings, labels)
    assert value.item() == pytest.approx(math.log(3) - 2 * scale, rel=1e-6)
    assert value.item() < 0
    softmax_loss, _, _ = orthogonal_setup(scale, include_positive=True)
    softmax_value = softmax_loss(embeddings, labels)
    assert softmax_value.item() == pytest.approx(math.log1p(3 * math.exp(-2 * scale)), abs=1e-6)
    assert softmax_value.item() >= 0


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_form_never_goes_below_zero(seed):
    loss = make_loss(seed, scale=30.0)
    embeddings, labels = random_batch(seed)
    with torch.no_grad():  # on their own proxies, as close as it gets
        embeddings = loss.proxies[labels] + 1e-3 * embeddings
    assert loss(embeddings, labels).item() >= 0
    assert make_loss(seed, scale=30.0, include_positive=False)(embeddings, labels).item() < 0


@pytest.mark.parametrize("scale", [0.5, 3.0, 9.0, 32.0])
def test_scale_is_an_inverse_temperature_on_squared_unit_distances(scale):
    loss = make_loss(scale=scale)
    embeddings, labels = random_batch(0)
    x, p = F.normalize(embeddings), F.normalize(loss.proxies.detach())
    distances = ((x[:, None, :] - p[None, :, :]) ** 2).sum(dim=2)
    expected = F.cross_entropy(-scale * distances, labels)
    torch.testing.assert_close(loss(embeddings, labels), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_puts_eps_over_k_minus_one_on_the_others(eps, seed):
    loss = make_loss(seed, label_smoothing=eps)
    check_against_naive(loss, seed)
    embeddings, labels = random_batch(seed)
    x, p = F.normalize(embeddings), F.normalize(loss.proxies.detach())
    logits = -loss.scale * ((x[:, None, :] - p[None, :, :]) ** 2).sum(dim=2)
    targets = torch.full((len(labels), C), eps / (C - 1), dtype=torch.float64)
    targets[torch.arange(len(labels)), labels] = 1 - eps
    by_hand = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    value = loss(embeddings, labels)
    torch.testing.assert_close(value, by_hand, rtol=1e-10, atol=1e-10)
    # torch's eps / C form is another target, so another loss at the same eps; it is ours
    # at eps * C / (C - 1).
    torch_form = F.cross_entropy(logits, labels, label_smoothing=eps)
    assert abs(value.item() - torch_form.item()) > 1e-3
    rescaled = F.cross_entropy(logits, labels, label_smoothing=eps * C / (C - 1))
    torch.testing.assert_close(value, rescaled, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_smoothing_over_shared_proxies_matches_a_naive_loop(seed):
    loss = make_loss(seed, label_smoothing=0.2, proxies_per_class=0.5)
    check_against_naive(loss, seed, proxy_of_class=[0, 1, 2, 0, 1])


# --- Stats, gradients, precision -------------------------------------------------------------


def test_stats_and_loss_by_hand_on_three_points():
    # Proxies along +x, +y, -x (any length: the loss normalizes them).
    loss = ProxyNCALoss(3, 2, scale=2.0)
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[0.1, 0.0], [0.0, 5.0], [-2.0, 0.0]]))
    embeddings = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    # Squared distances between unit vectors: 2 - 2 cos.
    r = math.sqrt(2)
    distances = [[0, 2, 4], [2, 4, 2], [2 - r, 2 - r, 2 + r]]
    value = loss(embeddings, labels)
    expected = sum(
        2 * d[y] + math.log(sum(math.exp(-2 * v) for v in d))
        for d, y in zip(distances, labels.tolist(), strict=True)
    )
    assert value.item() == pytest.approx(expected / 3, rel=1e-6)
    assert loss.stats == pytest.approx(
        {
            "mean_pos_distance": (0 + 4 + 2 + r) / 3,
            "mean_neg_distance": (2 + 4 + 2 + 2 + 2 * (2 - r)) / 6,
            # Only the first is nearest to its own proxy (the others are tied elsewhere).
            "proxy_accuracy": 1 / 3,
        },
        rel=1e-6,
    )
    assert all(type(v) is float for v in loss.stats.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"include_positive": False},
        {"proxies_per_class": 2},
        {"proxies_per_class": 0.5, "include_positive": False},
        {"label_smoothing": 0.1},
    ],
    ids=str,
)
def test_gradients_reach_the_proxies_and_the_embeddings(kwargs):
    torch.manual_seed(0)
    loss = ProxyNCALoss(C, D, **kwargs)
    embeddings = torch.randn(10, D, requires_grad=True)
    loss(embeddings, torch.arange(10) % C).backward()
    assert loss.proxies.grad is not None and loss.proxies.grad.abs().sum() > 0
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("include_positive", [True, False])
@pytest.mark.parametrize("proxies_per_class", [1, 2, 0.5])
def test_gradients_are_finite_when_embeddings_sit_on_their_proxies(
    include_positive, proxies_per_class
):
    torch.manual_seed(0)
    loss = ProxyNCALoss(
        C, D, include_positive=include_positive, proxies_per_class=proxies_per_class
    )
    labels = torch.arange(10) % C
    # Each embedding a copy of its class's first (or assigned) proxy.
    if proxies_per_class == 0.5:
        rows = loss.proxy_of_class[labels]
    else:
        rows = labels * proxies_per_class
    embeddings = loss.proxies.detach()[rows].clone().requires_grad_()
    value = loss(embeddings, labels)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(loss.proxies.grad).all()
    assert loss.stats["mean_pos_distance"] == pytest.approx(0, abs=1e-6)


def test_mixed_precision_does_not_round_the_distances():
    loss = make_loss().float()
    embeddings, labels = random_batch(0)
    expected, _ = naive_proxy_nca(embeddings, labels, loss.proxies.detach().double(), 9.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(embeddings.float(), labels)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_embedding_gives_a_nan_loss(bad):
    embeddings, labels = random_batch(0)
    embeddings[3, 0] = bad
    assert math.isnan(make_loss()(embeddings, labels).item())


# --- Construction: proxies, attributes, errors ------------------------------------------------


def test_proxies_start_small_and_are_the_only_parameter():
    torch.manual_seed(0)
    loss = ProxyNCALoss(num_classes=100, embedding_size=64)
    assert (loss.num_classes, loss.embedding_size) == (100, 64)
    assert [name for name, _ in loss.named_parameters()] == ["proxies"]
    assert isinstance(loss.proxies, torch.nn.Parameter) and loss.proxies.shape == (100, 64)
    assert loss.proxies.std().item() == pytest.approx(1 / 8, abs=0.005)
    assert loss.proxies.mean().item() == pytest.approx(0, abs=0.005)
    assert list(loss.state_dict()) == ["proxies"]


@pytest.mark.parametrize("bad_label", [-1, C])
def test_labels_out_of_range_are_an_error(bad_label):
    with pytest.raises(ValueError, match=f"{bad_label}.*num_classes={C}.*relabel.*0..C-1"):
        ProxyNCALoss(C, D)(torch.randn(2, D), torch.tensor([0, bad_label]))


@pytest.mark.parametrize("shape", [(2, D + 1), (2, 1, D), (0, D)])
def test_embeddings_of_the_wrong_shape_are_an_error(shape):
    with pytest.raises(ValueError, match=rf"\(N, {D}\).*embedding_size"):
        ProxyNCALoss(C, D)(torch.randn(shape), torch.zeros(shape[0], dtype=torch.long))


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0])])
def test_labels_of_the_wrong_shape_or_type_are_an_error(labels):
    with pytest.raises(ValueError, match=r"\(2,\) integers"):
        ProxyNCALoss(C, D)(torch.randn(2, D), labels)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_a_scale_that_is_not_positive_is_an_error(scale):
    with pytest.raises(ValueError, match=f"scale={scale} must be > 0"):
        ProxyNCALoss(C, D, scale=scale)


@pytest.mark.parametrize("value", [0, -1, 1.5, 0.1, 1.0000001, "2", True, float("nan")])
def test_invalid_proxies_per_class_is_an_error(value):
    # 0.1 of 5 classes leaves a single proxy, which every class would share.
    with pytest.raises(ValueError, match=r"proxies_per_class=.*whole number >= 1.*0 < f < 1"):
        ProxyNCALoss(C, D, proxies_per_class=value)


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_an_error(eps):
    with pytest.raises(ValueError, match=rf"label_smoothing={eps} must be in \[0, 1\)"):
        ProxyNCALoss(C, D, label_smoothing=eps)


def test_label_smoothing_with_the_paper_form_is_an_error():
    with pytest.raises(ValueError, match="softmax form.*include_positive=True"):
        ProxyNCALoss(C, D, include_positive=False, label_smoothing=0.1)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_fewer_than_two_classes_is_an_error(num_classes):
    with pytest.raises(ValueError, match=f"num_classes={num_classes}.*at least 2 classes"):
        ProxyNCALoss(num_classes, D)
