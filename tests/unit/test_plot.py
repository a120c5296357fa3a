import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from utils_cv.similarity import plot  # noqa: E402

GREEN = to_rgba(plot.MATCH_COLOR)
RED = to_rgba(plot.MISMATCH_COLOR)
PLAIN = to_rgba(plot.TILE_EDGE_COLOR)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def needs_metrics():
    # plot_rank_examples, plot_distance_grid and plot_distance_histograms use the shared metrics.
    pytest.importorskip("utils_cv.similarity.metrics")


def make_images(count, size=6):
    """(count, 3, size, size) uint8, image i filled with the value 20 * i so tiles can be told apart."""
    values = torch.arange(count, dtype=torch.uint8) * 20
    return values[:, None, None, None].expand(count, 3, size, size).clone()


def tile_value(ax):
    """The fill value of the image shown in a tile."""
    return int(np.asarray(ax.images[0].get_array())[0, 0, 0])


def frame_color(ax):
    colors = {spine.get_edgecolor() for spine in ax.spines.values()}
    assert len(colors) == 1
    return colors.pop()


def test_show_image_grid():
    images = make_images(5)
    fig = plot.show_image_grid(images, titles=list("abcde"), ncols=3)
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes] == list("abcde")
    assert [tile_value(ax) for ax in fig.axes] == [0, 20, 40, 60, 80]
    assert fig.axes[0].get_xticks().size == 0 and fig.axes[0].get_yticks().size == 0


def test_show_image_grid_float_and_gray_images():
    float_images = np.full((2, 3, 4, 4), 0.5, dtype=np.float32)
    fig = plot.show_image_grid(float_images)
    assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), 0.5)
    gray = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    fig = plot.show_image_grid(gray)
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == (4, 4)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"images": make_images(2), "titles": ["a"]}, "1 titles for 2 images"),
        ({"images": make_images(0)}, "empty"),
        ({"images": torch.zeros(2, 4, 4, 4, dtype=torch.uint8)}, r"shape \(3, H, W\)"),
    ],
)
def test_show_image_grid_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        plot.show_image_grid(**kwargs)


def test_plot_rank_captions_and_frames():
    images = make_images(4)
    fig = plot.plot_rank(
        images[0],
        images[1:],
        distances=torch.tensor([0.0, 0.5, 1.234]),
        matches=[True, False, True],
        reference_titles=["cat", "dog", "cat"],
    )
    axes = fig.axes
    assert len(axes) == 4
    assert axes[0].get_title() == "query"
    assert frame_color(axes[0]) == PLAIN
    assert [ax.get_title() for ax in axes[1:]] == [
        "rank: 1, dist: 0.00\nmatch\ncat",
        "rank: 2, dist: 0.50\nno match\ndog",
        "rank: 3, dist: 1.23\nmatch\ncat",
    ]
    assert [frame_color(ax) for ax in axes[1:]] == [GREEN, RED, GREEN]
    assert [tile_value(ax) for ax in axes] == [0, 20, 40, 60]


def test_plot_rank_without_matches_draws_no_frames():
    images = make_images(3)
    fig = plot.plot_rank(images[0], images[1:], np.array([0.3, 0.9]), query_title="q7")
    assert fig.axes[0].get_title() == "q7"
    assert [ax.get_title() for ax in fig.axes[1:]] == ["rank: 1, dist: 0.30", "rank: 2, dist: 0.90"]
    assert [frame_color(ax) for ax in fig.axes] == [PLAIN, PLAIN, PLAIN]


def test_plot_rank_wraps_long_titles():
    images = make_images(2)
    name = "smiling face with open mouth and smiling eyes"
    fig = plot.plot_rank(images[0], images[1:], [0.1], reference_titles=[name])
    lines = fig.axes[1].get_title().split("\n")
    assert lines[0] == "rank: 1, dist: 0.10"
    assert " ".join(lines[1:]) == name
    assert max(len(line) for line in lines) <= plot.CAPTION_WIDTH


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"distances": [0.1]}, "1 distances for 2 reference images"),
        ({"distances": [0.1, 0.2], "matches": [True]}, "1 matches for 2"),
        ({"distances": [0.1, 0.2], "reference_titles": ["a"]}, "1 reference_titles for 2"),
    ],
)
def test_plot_rank_errors(kwargs, pattern):
    images = make_images(3)
    with pytest.raises(ValueError, match=pattern):
        plot.plot_rank(images[0], images[1:], **kwargs)


def test_plot_rank_examples_excludes_self_and_marks_matches(needs_metrics):
    images = make_images(5)
    # 1-D embeddings, so the neighbours and distances are known; images 3 and 4 are duplicates.
    embeddings = torch.tensor([[0.0], [1.0], [3.0], [7.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    fig = plot.plot_rank_examples(
        images, labels, embeddings, query_indices=[0, 3], k=2, titles=list("abcde")
    )
    axes = fig.axes
    assert len(axes) == 6
    assert [tile_value(ax) for ax in axes] == [0, 20, 40, 60, 80, 40]
    assert [ax.get_title() for ax in axes] == [
        "query\na",
        "rank: 1, dist: 1.00\nmatch\nb",
        "rank: 2, dist: 3.00\nno match\nc",
        "query\nd",
        "rank: 1, dist: 0.00\nno match\ne",
        "rank: 2, dist: 4.00\nmatch\nc",
    ]
    assert [frame_color(ax) for ax in axes] == [PLAIN, GREEN, RED, PLAIN, RED, GREEN]


def test_plot_rank_examples_cosine(needs_metrics):
    images = make_images(3)
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    fig = plot.plot_rank_examples(
        images, torch.tensor([0, 1, 0]), embeddings, [0], k=2, metric="cosine"
    )
    # 1 - cos: to image 2 is 1 - 1/sqrt(2) = 0.29, to image 1 is 1.
    assert [ax.get_title() for ax in fig.axes[1:]] == [
        "rank: 1, dist: 0.29\nmatch",
        "rank: 2, dist: 1.00\nno match",
    ]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"query_indices": [5]}, "query index 5 is out of range"),
        ({"query_indices": [0], "k": 5}, "k=5"),
        ({"query_indices": []}, "empty"),
        ({"query_indices": [0], "titles": ["a"]}, "1 titles"),
    ],
)
def test_plot_rank_examples_errors(needs_metrics, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        plot.plot_rank_examples(make_images(5), torch.arange(5), torch.randn(5, 2), **kwargs)


def test_plot_distance_grid_values(needs_metrics):
    images = make_images(3)
    embeddings = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    fig = plot.plot_distance_grid(images, embeddings)
    # heatmap + 3 column and 3 row thumbnails + colorbar
    assert len(fig.axes) == 8
    heatmap = fig.axes[0]
    cells = {
        (int(t.get_position()[1]), int(t.get_position()[0])): t.get_text() for t in heatmap.texts
    }
    expected = np.array([[0.0, 5.0, 1.0], [5.0, 0.0, np.sqrt(18)], [1.0, np.sqrt(18), 0.0]])
    assert cells == {(i, j): f"{expected[i, j]:.2f}" for i in range(3) for j in range(3)}
    assert np.allclose(np.asarray(heatmap.images[0].get_array()), expected, atol=1e-5)
    assert sorted(tile_value(ax) for ax in fig.axes[1:7]) == [0, 0, 20, 20, 40, 40]


@pytest.mark.parametrize("count", [1, 17])
def test_plot_distance_grid_size_limits(needs_metrics, count):
    with pytest.raises(ValueError, match="2 to 16 images"):
        plot.plot_distance_grid(make_images(count), torch.randn(count, 2))


def test_plot_recall_curves():
    results = {
        "softmax": {"recall@1": 0.2, "recall@4": 0.5, "recall@2": 0.3, "map@r": 0.1},
        "pixels": {"recall@1": 0.05, "recall@2": 0.08, "recall@4": 0.12, "recall@8": 0.2},
    }
    fig = plot.plot_recall_curves(results, title="emoji")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["softmax", "pixels"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["softmax", "pixels"]
    assert list(lines[0].get_xdata()) == [1, 2, 4]
    assert list(lines[0].get_ydata()) == [0.2, 0.3, 0.5]
    assert list(lines[1].get_xdata()) == [1, 2, 4, 8]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert ax.get_title() == "emoji"


def test_plot_recall_curves_on_given_axes_and_errors():
    fig, (left, right) = plt.subplots(1, 2)
    assert plot.plot_recall_curves({"a": {"recall@1": 0.5}}, ax=right) is fig
    assert len(right.get_lines()) == 1 and len(left.get_lines()) == 0
    with pytest.raises(ValueError, match="results\\['a'\\] has no 'recall@K' keys"):
        plot.plot_recall_curves({"a": {"map@r": 0.5}})
    with pytest.raises(ValueError, match="empty"):
        plot.plot_recall_curves({})


def clustered_embeddings(count=30, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    centers = torch.randn(classes, 8, generator=generator) * 5
    return centers[labels] + torch.randn(count, 8, generator=generator), labels


def test_plot_embedding_map_pca_matches_sklearn_and_colours_by_class():
    embeddings, labels = clustered_embeddings()
    fig = plot.plot_embedding_map(
        embeddings, labels, method="pca", class_names=["zero", "one", "two"]
    )
    ax = fig.axes[0]
    points = ax.collections[0]
    expected = PCA(n_components=2, random_state=0).fit_transform(embeddings.numpy())
    assert np.allclose(points.get_offsets(), expected, atol=1e-4)
    colors = points.get_facecolors()
    for label in range(3):
        same = colors[labels.numpy() == label]
        assert (same == same[0]).all()
    assert len({tuple(c) for c in colors}) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero", "one", "two"]


def test_plot_embedding_map_subsample_and_thumbnails():
    embeddings, labels = clustered_embeddings(count=40)
    images = make_images(40)
    fig = plot.plot_embedding_map(
        embeddings, labels, images=images, method="pca", max_points=25, num_thumbnails=6
    )
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 25
    boxes = [artist for artist in ax.artists if isinstance(artist, AnnotationBbox)]
    assert 1 <= len(boxes) <= 6
    assert ax.get_legend() is None


def test_plot_embedding_map_tsne_repeats_and_keeps_clusters():
    embeddings, labels = clustered_embeddings(count=24)
    first, second = (
        np.asarray(plot.plot_embedding_map(embeddings, labels).axes[0].collections[0].get_offsets())
        for _ in range(2)
    )
    assert first.shape == (24, 2)
    assert np.array_equal(first, second)
    # The classes are well separated in 8-D, so each point's nearest point on the map shares its class.
    gaps = np.linalg.norm(first[:, None] - first[None], axis=2) + np.diag(np.full(24, np.inf))
    assert (labels.numpy()[gaps.argmin(axis=1)] == labels.numpy()).all()


def test_plot_embedding_map_seed_picks_the_subsample():
    embeddings, labels = clustered_embeddings(count=30)
    offsets = [
        np.asarray(
            plot.plot_embedding_map(embeddings, labels, method="pca", max_points=10, seed=seed)
            .axes[0]
            .collections[0]
            .get_offsets()
        )
        for seed in (0, 0, 1)
    ]
    assert np.array_equal(offsets[0], offsets[1])
    assert not np.array_equal(offsets[0], offsets[2])


@pytest.mark.parametrize(
    "embeddings, labels, kwargs, pattern",
    [
        (torch.randn(5, 2), torch.zeros(5), {"method": "umap"}, "method='umap'"),
        (torch.full((5, 2), float("nan")), torch.zeros(5), {}, "NaN"),
        (torch.randn(5, 2), torch.zeros(4), {}, "4 labels for 5"),
        (torch.randn(2, 2), torch.zeros(2), {}, "at least 3"),
    ],
)
def test_plot_embedding_map_errors(embeddings, labels, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        plot.plot_embedding_map(embeddings, labels, **kwargs)


def test_plot_training_curves_splits_losses_and_metrics():
    history = [
        {"epoch": 0, "train_loss": 2.0, "val_loss": 2.5, "val_recall@1": 0.1, "time": "00:01"},
        {"epoch": 1, "train_loss": 1.5, "val_recall@1": np.float32(0.2)},
        {"epoch": 2, "train_loss": torch.tensor(1.0), "val_loss": 2.0, "val_recall@1": 0.25},
    ]
    fig = plot.plot_training_curves(history)
    assert len(fig.axes) == 2
    loss_ax, metric_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"train_loss", "val_loss"}
    assert list(lines["train_loss"].get_ydata()) == [2.0, 1.5, 1.0]
    assert list(lines["val_loss"].get_xdata()) == [0.0, 2.0]
    (recall,) = metric_ax.get_lines()
    assert recall.get_label() == "val_recall@1"
    assert np.allclose(recall.get_ydata(), [0.1, 0.2, 0.25])
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "epoch"]
    ticks = loss_ax.get_xticks()
    assert np.array_equal(ticks, np.round(ticks))


def test_plot_training_curves_loss_only():
    fig = plot.plot_training_curves(
        [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]
    )
    assert len(fig.axes) == 1
    assert fig.axes[0].get_ylabel() == "loss"


@pytest.mark.parametrize(
    "history, pattern",
    [
        ([], "empty"),
        ([{"train_loss": 1.0}], "history\\[0\\] has no 'epoch'"),
        ([{"epoch": 0, "time": "00:01"}], "no numeric values"),
    ],
)
def test_plot_training_curves_errors(history, pattern):
    with pytest.raises(ValueError, match=pattern):
        plot.plot_training_curves(history)


def positive_extent(patch):
    """x range of the bins with non-zero height in a stepfilled histogram."""
    xy = patch.get_xy()
    return xy[xy[:, 1] > 0, 0].min(), xy[xy[:, 1] > 0, 0].max()


def test_plot_distance_histograms_separates_pairs(needs_metrics):
    embeddings = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    fig, ax = plt.subplots()
    assert plot.plot_distance_histograms(embeddings, labels, ax=ax, title="t", bins=50) is fig
    same, different = ax.patches
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "same class (4 pairs)",
        "different class (6 pairs)",
    ]
    # Same-class distances are 0.1, 0.1, 0.2 and 0.1; different-class ones 9.8 to 10.1.
    bin_width = (10.1 - 0.1) / 50
    low, high = positive_extent(same)
    assert low == pytest.approx(0.1, abs=1e-5) and high <= 0.2 + bin_width + 1e-5
    low, high = positive_extent(different)
    assert low >= 9.8 - bin_width - 1e-6 and high == pytest.approx(10.1, abs=1e-5)
    assert same.get_facecolor()[:3] == GREEN[:3] and different.get_facecolor()[:3] == RED[:3]
    assert ax.get_title() == "t"
    assert ax.get_xlim()[0] == 0


def test_plot_distance_histograms_subsamples(needs_metrics):
    embeddings, labels = clustered_embeddings(count=30)
    fig = plot.plot_distance_histograms(embeddings, labels, max_points=10)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    pairs = [int(text.split("(")[1].split()[0]) for text in texts]
    assert sum(pairs) == 10 * 9 // 2


def test_plot_distance_histograms_needs_both_kinds_of_pairs(needs_metrics):
    with pytest.raises(ValueError, match="0 same-class"):
        plot.plot_distance_histograms(torch.randn(4, 2), torch.arange(4))


def test_plot_histories_one_panel_per_key_one_line_per_run():
    histories = {
        "softmax": [{"epoch": e, "train_loss": 2.0 - e, "val_recall@1": 0.1 * e} for e in range(3)],
        "triplet": [
            {"epoch": e, "train_loss": 0.3, "loss_active_fraction": 0.5, "val_recall@1": 0.2}
            for e in range(3)
        ],
    }
    keys = {"train_loss": "loss", "loss_active_fraction": "active", "val_recall@1": "recall"}
    fig = plot.plot_histories(histories, keys, log_scale=["train_loss"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["loss", "active", "recall"]
    assert [len(ax.lines) for ax in axes] == [2, 1, 2]  # softmax has no active share
    assert axes[0].get_yscale() == "log" and axes[2].get_yscale() == "linear"
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), [2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="at least one"):
        plot.plot_histories({}, keys)


def test_plot_example_queries_shows_the_fixed_queries_with_class_names(needs_metrics):
    from utils_cv.similarity.datasets import ImageData, example_queries

    n = 8
    data = ImageData(
        images=make_images(n),
        labels=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        class_names=["apple", "pear", "fig", "kiwi"],
        splits=["test"] * n,
        domains=["a", "b"] * 4,
        paths=[""] * n,
    )
    embeddings = torch.tensor([[float(label), 0.0] for label in [0, 0, 1, 1, 2, 2, 3, 3]])
    fig = plot.plot_example_queries(data, embeddings, count=2, k=3, domain="a")
    queries = example_queries(data, count=2, domain="a")
    rows = [fig.axes[i * 4 : (i + 1) * 4] for i in range(2)]
    for row, query in zip(rows, queries, strict=True):
        assert tile_value(row[0]) == 20 * query
        assert data.class_names[data.labels[query]] in row[0].get_title()
        assert frame_color(row[1]) == GREEN  # its class partner comes first


def test_plot_distance_panels_one_histogram_pair_per_embedding(needs_metrics):
    labels = torch.tensor([0, 0, 1, 1])
    spread = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 4.0], [3.1, 4.0]])
    fig = plot.plot_distance_panels({"spread": spread, "shrunk": spread / 100}, labels)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("spread (mean 3.3") and titles[1].startswith("shrunk (mean 0.03")
    with pytest.raises(ValueError, match="empty"):
        plot.plot_distance_panels({}, labels)


def test_plot_mining_choices_points_at_the_right_neighbours():
    # Anchor 0 at the origin; its class mate 1 at distance 2, negatives at 1 and 3.
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    fig = plot.plot_mining_choices(points, labels, anchor=0)
    arrows = {t.get_text(): tuple(t.xy) for t in fig.axes[0].texts if t.get_text()}
    assert arrows["hardest positive"] == (2.0, 0.0)
    assert arrows["hardest negative"] == (0.0, 1.0)
    assert arrows["semi-hard negative\n(for the hardest positive)"] == (0.0, 3.0)
    with pytest.raises(ValueError, match="needs a positive"):
        plot.plot_mining_choices(points, torch.tensor([0, 1, 1, 1]), anchor=0)


def test_plot_embedding_expansion_arrows_point_at_the_mined_negatives():
    # The circle example of tests/unit/test_embedding_expansion.py: anchor 0's mined negative
    # is class 1's projected synthetic point at -12.48 degrees; batch-hard's is x_3 (-40).
    angles = torch.tensor([0.0, 55.0, 100.0, 320.0]) * np.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    fig = plot.plot_embedding_expansion(points, torch.tensor([0, 0, 1, 1]), n_points=2)
    without, with_projection = fig.axes
    assert "synthetic" in with_projection.get_title()
    mined, batch_hard = (np.asarray(t.xy, dtype=float) for t in with_projection.texts)
    angle = np.radians(-12.4842)
    np.testing.assert_allclose(mined, [np.cos(angle), np.sin(angle)], atol=1e-4)
    np.testing.assert_allclose(batch_hard, points[3].numpy(), atol=1e-6)
    assert len(without.texts) == 2
    plt.close(fig)
    # n_points=0 draws no segments, so odd class sizes are fine.
    plt.close(plot.plot_embedding_expansion(points[:3], torch.tensor([0, 0, 1]), n_points=0))


def test_show_class_examples_one_image_per_domain_of_the_best_covered_classes():
    from utils_cv.similarity.datasets import ImageData

    labels = [0, 0, 1, 1, 1, 2, 2, 2]
    domains = ["a", "a", "b", "a", "c", "a", "b", "c"]
    data = ImageData(
        images=make_images(8),
        labels=torch.tensor(labels),
        class_names=["zero", "one", "two"],
        splits=["test"] * 8,
        domains=domains,
        paths=[""] * 8,
    )
    fig = plot.show_class_examples(data, count=2, per_class=3)
    titles = [ax.get_title() for ax in fig.axes]
    # Classes 1 and 2 have three domains each, shown in the order domains first appear (a, b, c).
    assert titles == ["one\na", "one\nb", "one\nc", "two\na", "two\nb", "two\nc"]
    assert [tile_value(ax) for ax in fig.axes] == [60, 40, 80, 100, 120, 140]
    plain = ImageData(data.images, data.labels, data.class_names, data.splits, [""] * 8, [""] * 8)
    titles = [ax.get_title() for ax in plot.show_class_examples(plain, count=1).axes]
    assert titles == ["one"] * 3  # without domains: the first of the largest classes


def test_figures_of_emoji_images_carry_the_designs_attribution():
    from utils_cv.similarity.datasets import ImageData
    from utils_cv.similarity.datasets.emoji import ATTRIBUTION

    data = ImageData(
        images=make_images(4),
        labels=torch.tensor([0, 0, 1, 1]),
        class_names=["zero", "one"],
        splits=["test"] * 4,
        domains=["twemoji", "fluent_flat", "twemoji", "fluent_flat"],
        paths=[""] * 4,
    )
    credit = plot.show_class_examples(data)._supxlabel.get_text().replace("\n", " ")
    assert ATTRIBUTION["twemoji"] in credit and ATTRIBUTION["fluent_flat"] in credit
    assert ATTRIBUTION["openmoji"] not in credit  # only the designs shown
    own = ImageData(data.images, data.labels, data.class_names, data.splits, ["a"] * 4, [""] * 4)
    assert plot.show_class_examples(own)._supxlabel is None  # your own images: no credit line
    plt.close("all")
