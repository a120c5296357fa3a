"""Plots for proxy losses: what each panel shows, checked on inputs with known answers."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from utils_cv.similarity import plot  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_softmax_over_proxies_sharpens_with_the_scale():
    fig = plot.plot_softmax_over_proxies([0.5, 1.0, 1.5], scales=[1, 10])
    low, high = (np.array([bar.get_height() for bar in ax.patches]) for ax in fig.axes)
    expected = np.exp(-np.array([0.5, 1.0, 1.5]))
    np.testing.assert_allclose(low, expected / expected.sum(), rtol=1e-6)
    assert high[0] > 0.99 and fig.axes[1].get_title().startswith("scale 10: p(own) = 0.99")
    with pytest.raises(ValueError, match="two distances"):
        plot.plot_softmax_over_proxies([0.5], scales=[1])


def test_point_snapshots_draw_unit_vectors_and_one_star_per_proxy():
    points = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    proxies = torch.tensor([[5.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    fig = plot.plot_point_snapshots([("start", points, proxies)] * 3, labels=[0, 1], ncols=2)
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "start"
    dots, stars = fig.axes[0].collections
    np.testing.assert_allclose(dots.get_offsets(), [[1, 0], [0, -1]])
    np.testing.assert_allclose(stars.get_offsets(), [[1, 0], [0, 1], [-1, 0]])


def test_proxy_map_reports_the_mean_cosine_between_proxies():
    proxies = torch.eye(4, 8)  # orthogonal: every cosine 0
    embeddings, labels = torch.randn(20, 8), torch.arange(20) % 4
    fig = plot.plot_proxy_map(embeddings, labels, proxies, max_classes=2)
    left, right = fig.axes[:2]
    assert right.get_title() == "cosine between proxies (mean 0.000)"
    stars, dots = left.collections
    assert len(stars.get_offsets()) == 4 and len(dots.get_offsets()) == 10  # 2 classes of 5
    with pytest.raises(ValueError, match="D=8 but proxies D=3"):
        plot.plot_proxy_map(embeddings, labels, torch.eye(3))


def test_temperatures_match_a_softmax_and_its_gradient_computed_by_torch():
    margins = [-0.3, 0.0, 0.4]
    fig = plot.plot_temperatures([1.0, 0.1], num_classes=5, margins=margins)
    left, right = fig.axes
    for t, p_line, grad_line in zip([1.0, 0.1], left.lines, right.lines, strict=True):
        cosines = torch.zeros(3, 5, dtype=torch.float64)
        cosines[:, 0] = torch.tensor(margins, dtype=torch.float64)
        cosines.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(cosines / t, torch.zeros(3, dtype=torch.long),
                                                 reduction="sum")  # fmt: skip
        loss.backward()
        p_own = torch.softmax(cosines.detach() / t, dim=1)[:, 0]
        np.testing.assert_allclose(p_line.get_ydata(), p_own.numpy(), rtol=1e-9)
        np.testing.assert_allclose(grad_line.get_ydata(), -cosines.grad[:, 0].numpy(), rtol=1e-9)
    # The smallest loss: own cosine 1, the four others at -1/4.
    floor = torch.nn.functional.cross_entropy(
        torch.tensor([[1.0, -0.25, -0.25, -0.25, -0.25]]) / 1.0, torch.tensor([0])
    )
    assert left.get_legend().get_texts()[0].get_text() == f"T = 1 (loss ≥ {floor.item():.2g})"
    with pytest.raises(ValueError, match="temperature > 0"):
        plot.plot_temperatures([0.0], num_classes=5)
