import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from utils_cv.similarity.metrics import (
    classification_metrics,
    compute_distances,
    nearest_neighbors,
    pairwise_f1,
    retrieval_metrics,
)

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def clustered(num_points=400, num_classes=90, dim=16, noise=0.8, seed=0, unit=False):
    """Points around random class centres: metrics land mid-range, unlike pure noise.

    With 90 classes among 400 points several classes have a single image (no positive).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, num_points)
    x = centers[labels] + noise * rng.normal(size=(num_points, dim))
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def pml_accuracy(query, query_labels, reference=None, reference_labels=None):
    calculator = AccuracyCalculator(
        include=PML_METRICS, k="max_bin_count", device=torch.device("cpu")
    )
    return calculator.get_accuracy(
        query, query_labels, reference, reference_labels, ref_includes_query=False
    )


# Six points on a line, all 15 pairwise distances distinct:
#   index     0  1  2  3  4   5
#   position  0  1  3  7  12  20
#   class     A  B  A  A  B   C
# Neighbours of each query, nearest first (distance, class); R = same-class others:
#   q0 (A, R=2): 1 B, 3 A, 7 A, 12 B, 20 C  first hit rank 2  R-prec 1/2  MAP@R (1/2)/2 = 1/4
#   q1 (B, R=1): 1 A, 2 A, 6 A, 11 B, 19 C  first hit rank 4  R-prec 0    MAP@R 0
#   q2 (A, R=2): 2 B, 3 A, 4 A, 9 B, 17 C   first hit rank 2  R-prec 1/2  MAP@R 1/4
#   q3 (A, R=2): 4 A, 5 B, 6 B, 7 A, 13 C   first hit rank 1  R-prec 1/2  MAP@R (1/1)/2 = 1/2
#   q4 (B, R=1): 5 A, 8 C, 9 A, 11 B, 12 A  first hit rank 4  R-prec 0    MAP@R 0
#   q5 (C, R=0): skipped
# recall@1 = 1/5, recall@2 = 3/5, recall@4 = 5/5, R-precision = 1.5/5, MAP@R = 1/5.
LINE = np.array([0.0, 1, 3, 7, 12, 20])[:, None]
LINE_LABELS = ["A", "B", "A", "A", "B", "C"]


def test_hand_computed_example():
    result = retrieval_metrics(LINE, LINE_LABELS, ks=(1, 2, 4))
    assert result == pytest.approx(
        {
            "recall@1": 0.2,
            "recall@2": 0.6,
            "recall@4": 1.0,
            "r_precision": 0.3,
            "map@r": 0.2,
            "num_queries": 5,
            "num_skipped_queries": 1,
        }
    )


def test_hand_computed_query_against_reference():
    # Gallery: 0 A, 2 B, 5 A, 9 C. Queries, neighbours nearest first:
    #   2.9 A (R=2): 2 B, 5 A, 0 A   recall@1 0, @2 1; R-prec 1/2; MAP@R (1/2)/2 = 1/4
    #   6   B (R=1): 5 A, 9 C, 2 B   recall@4 only;   R-prec 0;   MAP@R 0
    #   9   C (R=1): 9 C at distance 0 (not excluded: it is another image)  all 1
    #   3   D: no D in the reference, skipped
    reference = np.array([0.0, 2, 5, 9])[:, None]
    query = np.array([2.9, 6, 9, 3])[:, None]
    result = retrieval_metrics(
        query, list("ABCD"), ks=(1, 2, 4), reference=reference, reference_labels=list("ABAC")
    )
    assert result == pytest.approx(
        {
            "recall@1": 1 / 3,
            "recall@2": 2 / 3,
            "recall@4": 1.0,
            "r_precision": 0.5,
            "map@r": (1 / 4 + 0 + 1) / 3,
            "num_queries": 3,
            "num_skipped_queries": 1,
        }
    )


def test_query_itself_excluded_by_index_not_by_distance():
    # Rows 0 and 1 are duplicates: each is the other's nearest neighbour at distance 0.
    x = torch.tensor([[0.0], [0.0], [5.0], [5.5]])
    distances, indices = nearest_neighbors(x, k=1)
    assert indices[:, 0].tolist() == [1, 0, 3, 2]
    assert distances[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert retrieval_metrics(x, [0, 0, 1, 1], ks=(1,))["recall@1"] == 1.0
    # Against an explicit reference nothing is excluded: each point finds itself.
    _, indices = nearest_neighbors(x[1:], x[1:], k=1)
    assert indices[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_ties_come_in_reference_order_whatever_k(chunk_size):
    # torch.topk alone orders equal distances differently for different k.
    query = torch.zeros(3, 2)
    reference = torch.tensor([[3.0, 0.0]] + [[1.0, 0.0]] * 40 + [[0.0, 0.5]])
    for k in (1, 3, 8, 30):
        distances, indices = nearest_neighbors(query, reference, k=k, chunk_size=chunk_size)
        assert indices[0].tolist() == [41, *range(1, k)]
        assert distances[0].tolist() == pytest.approx([0.5] + [1.0] * (k - 1))
    # Ties inside the k kept but not at the k-th place.
    reference = torch.tensor([[5.0, 0.0]] + [[1.0, 0.0]] * 12 + [[2.0, 0.0], [3.0, 0.0]])
    _, indices = nearest_neighbors(query, reference, k=14, chunk_size=chunk_size)
    assert indices[0].tolist() == [*range(1, 13), 13, 14]


def test_metrics_with_ties_do_not_depend_on_the_other_ks():
    # 100 identical embeddings in 50 classes of two: every neighbour is tied, and reference
    # order decides. Rows 0 and 1 find each other first; every other row's first neighbours
    # are rows 0, 1, 2, ..., so row i finds its partner within 8 only for i < 8.
    x = torch.ones(100, 4)
    labels = torch.arange(100) // 2
    expected = {"recall@1": 0.02, "recall@2": 0.02, "recall@4": 0.04, "recall@8": 0.08}
    for ks in [(1,), (1, 2, 4, 8), (1, 50)]:
        for chunk_size in (None, 3):
            metrics = retrieval_metrics(x, labels, ks=ks, chunk_size=chunk_size)
            for k in ks:
                if f"recall@{k}" in expected:
                    assert metrics[f"recall@{k}"] == pytest.approx(expected[f"recall@{k}"])
            assert metrics["map@r"] == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("metric", "unit"),
    [("euclidean", False), ("squared_euclidean", False), ("euclidean", True), ("cosine", True)],
)
def test_matches_pytorch_metric_learning(metric, unit):
    # AccuracyCalculator ranks by L2 on the vectors as given; on unit vectors that is also the
    # cosine ranking. Its precision_at_1 is our recall@1 (one neighbour: any = all).
    x, labels = clustered(unit=unit)
    ours = retrieval_metrics(x, labels, ks=(1,), metric=metric)
    pml = pml_accuracy(x, labels)
    assert ours["num_skipped_queries"] > 0  # the data has single-image classes
    assert 0.2 < ours["recall@1"] < 0.95  # mid-range, so the comparison means something
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_query_against_reference_matches_pytorch_metric_learning():
    x, labels = clustered(num_points=600, seed=1)
    query, reference = x[:200], x[200:]
    ours = retrieval_metrics(
        query, labels[:200], ks=(1,), reference=reference, reference_labels=labels[200:]
    )
    pml = pml_accuracy(query, labels[:200], reference, labels[200:])
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_recall_at_k_against_brute_force():
    x, labels = clustered(num_points=200, num_classes=40, seed=2)
    order = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(x).double())
    order.fill_diagonal_(torch.inf)
    neighbour_labels = torch.from_numpy(labels)[order.argsort(dim=1)]
    same = (neighbour_labels == torch.from_numpy(labels)[:, None]).numpy()
    has_positive = np.bincount(labels)[labels] > 1
    ours = retrieval_metrics(x, labels, ks=(1, 3, 10, 50))
    for k in (1, 3, 10, 50):
        expected = same[has_positive, :k].any(axis=1).mean()
        assert ours[f"recall@{k}"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
def test_chunked_equals_unchunked(metric):
    x, labels = clustered(num_points=300, seed=3)
    full_d, full_i = nearest_neighbors(x, k=20, metric=metric, chunk_size=300)
    for chunk_size in (1, 7, None):
        d, i = nearest_neighbors(x, k=20, metric=metric, chunk_size=chunk_size)
        assert torch.equal(i, full_i)
        torch.testing.assert_close(d, full_d)
        assert retrieval_metrics(
            x, labels, metric=metric, chunk_size=chunk_size
        ) == retrieval_metrics(x, labels, metric=metric, chunk_size=300)


def test_nearest_neighbors_against_exact_distances():
    x, _ = clustered(num_points=120, seed=4)
    reference = x[:80] + 0.1
    exact = torch.cdist(
        torch.from_numpy(x).double(),
        torch.from_numpy(reference).double(),
        compute_mode="donot_use_mm_for_euclid_dist",
    )
    expected_d, expected_i = exact.topk(5, dim=1, largest=False)
    d, i = nearest_neighbors(x, reference, k=5, chunk_size=16)
    assert torch.equal(i, expected_i)
    torch.testing.assert_close(d, expected_d.float(), atol=1e-4, rtol=1e-5)


def test_compute_distances_against_cdist():
    rng = np.random.default_rng(5)
    q, r = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    exact = torch.cdist(
        torch.from_numpy(q), torch.from_numpy(r), compute_mode="donot_use_mm_for_euclid_dist"
    )
    d = compute_distances(q.astype(np.float32), torch.from_numpy(r).float())
    assert d.shape == (7, 9) and d.dtype == torch.float32
    torch.testing.assert_close(d, exact.float())
    d2 = compute_distances(q, r, metric="squared_euclidean")
    assert d2.dtype == torch.float64
    torch.testing.assert_close(d2, exact**2)
    cos = torch.nn.functional.cosine_similarity(
        torch.from_numpy(q)[:, None], torch.from_numpy(r)[None], dim=2
    )
    torch.testing.assert_close(compute_distances(q, r, metric="cosine"), 1 - cos)


def test_compute_distances_accurate_for_close_points_far_from_origin():
    # ||q||^2 + ||r||^2 - 2 q.r in float32 would lose these 1e-3 distances in rounding of
    # numbers near 1e4; the float64 computation keeps them.
    rng = np.random.default_rng(6)
    x = (100 + rng.normal(size=(6, 4))).astype(np.float32)
    y = x + np.float32(1e-3) * rng.normal(size=(6, 4)).astype(np.float32)
    exact = torch.cdist(
        torch.from_numpy(x).double(),
        torch.from_numpy(y).double(),
        compute_mode="donot_use_mm_for_euclid_dist",
    )
    d = compute_distances(x, y)
    torch.testing.assert_close(d.double(), exact, atol=1e-6, rtol=1e-5)
    self_d = compute_distances(x, x)
    assert (self_d >= 0).all() and self_d.diagonal().max() < 1e-5


def test_metrics_do_not_depend_on_input_type_or_label_type():
    x, labels = clustered(num_points=150, seed=7)
    expected = retrieval_metrics(x, labels)
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(labels)) == expected
    assert retrieval_metrics(x, [f"class {label}" for label in labels]) == expected
    assert retrieval_metrics(x, labels, metric="squared_euclidean") == expected


def test_nmi():
    # Two tight, distant clusters of twelve points each (two, because k-means from a random
    # start can leave two of several centroids in one cluster, and then NMI < 1).
    rng = np.random.default_rng(8)
    cluster = np.repeat([0, 1], 12)
    x = 100 * cluster[:, None] + rng.normal(size=(24, 8))
    assert retrieval_metrics(x, cluster, ks=(1,), nmi=True)["nmi"] == pytest.approx(1.0)
    # Labels spread evenly over the clusters (six of each in each) say nothing about them.
    spread = np.tile([0, 1], 12)
    assert retrieval_metrics(x, spread, ks=(1,), nmi=True)["nmi"] == pytest.approx(0.0, abs=1e-9)
    # Cluster 0 all label 0; cluster 1 half label 0, half label 1. Entropies (nats):
    # H(labels) = H(3/4, 1/4), H(clusters) = log 2, H(labels | clusters) = (log 2) / 2.
    uneven = np.repeat([0, 0, 1], [12, 6, 6])
    h_labels = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mutual_information = h_labels - np.log(2) / 2
    expected = mutual_information / ((h_labels + np.log(2)) / 2)  # arithmetic mean
    uneven_scores = retrieval_metrics(x, uneven, ks=(1,), nmi=True)
    assert uneven_scores["nmi"] == pytest.approx(expected)
    assert "nmi" not in retrieval_metrics(x, cluster, ks=(1,))
    # Pairwise F1 of the same clusterings. Perfect: 1. Uneven: pairs in one cluster
    # 2 * C(12, 2) = 132, pairs with one label C(18, 2) + C(6, 2) = 168, both: C(12, 2) in
    # cluster 0 + 2 * C(6, 2) in cluster 1 = 96; F1 = 2 TP / (132 + 168) = 0.64.
    assert retrieval_metrics(x, cluster, ks=(1,), nmi=True)["f1"] == pytest.approx(1.0)
    assert uneven_scores["f1"] == pytest.approx(0.64)
    # Spread: 2 * C(12, 2) = 132 same-cluster pairs, 132 same-label pairs, 2 * 2 * C(6, 2) =
    # 60 of them both: F1 = 120 / 264.
    spread_f1 = retrieval_metrics(x, spread, ks=(1,), nmi=True)["f1"]
    assert spread_f1 == pytest.approx(120 / 264)


def test_pairwise_f1_by_hand():
    # Labels a a b b, clusters 0 0 0 1. Pairs: (0,1) one label, one cluster (TP); (2,3) one
    # label, two clusters (FN); (0,2), (1,2) two labels, one cluster (FP); (0,3), (1,3) TN.
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4.
    assert pairwise_f1(["a", "a", "b", "b"], [0, 0, 0, 1]) == pytest.approx(0.4)
    assert pairwise_f1([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0  # cluster names do not matter
    assert pairwise_f1([0, 1, 2, 3], [0, 0, 1, 1]) == 0.0  # no pair shares a label
    assert pairwise_f1([0, 0, 1, 1], [0, 1, 2, 3]) == 0.0  # no pair shares a cluster


def test_errors():
    x, labels = clustered(num_points=20, num_classes=4)
    bad = x.copy()
    bad[[3, 11], 0] = np.nan
    bad[5, 1] = np.inf
    with pytest.raises(ValueError, match=r"3 of 20 rows with NaN or inf.*\[3, 5, 11\]"):
        retrieval_metrics(bad, labels)
    with pytest.raises(ValueError, match="labels has shape"):
        retrieval_metrics(x, labels[:-1])
    with pytest.raises(ValueError, match="no query has a same-class item"):
        retrieval_metrics(x, np.arange(20))
    with pytest.raises(ValueError, match="recall@20 asked but each query has only 19"):
        retrieval_metrics(x, labels, ks=(1, 20))
    with pytest.raises(ValueError, match="metric='manhattan'"):
        retrieval_metrics(x, labels, metric="manhattan")
    with pytest.raises(ValueError, match="ks="):
        retrieval_metrics(x, labels, ks=(0, 1))
    with pytest.raises(ValueError, match="without reference_labels"):
        retrieval_metrics(x, labels, reference=x)
    with pytest.raises(ValueError, match="k=20 but there are 19 references"):
        nearest_neighbors(x, k=20)
    with pytest.raises(ValueError, match="dimension"):
        compute_distances(x, x[:, :3])


def test_mean_distance_by_hand_and_its_limits():
    from utils_cv.similarity.metrics import mean_distance

    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # distances 5, 4 and 3
    assert mean_distance(points) == pytest.approx(4.0)
    assert mean_distance(points, max_points=2) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least two"):
        mean_distance(points[:1])


def test_mean_cosine_by_hand_and_its_limits():
    from utils_cv.similarity.metrics import mean_cosine

    # Rows of any length: (1, 0), (0, 2), (3, 3) -> cosines 0, sqrt(1/2), sqrt(1/2).
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert mean_cosine(rows) == pytest.approx(2 * 0.5**0.5 / 3)
    assert mean_cosine(torch.eye(5)) == pytest.approx(0.0)
    assert mean_cosine(rows, max_points=2) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least two"):
        mean_cosine(rows[:1])


# classification_metrics


# Eight images of three classes, four of class 0; predictions right on 5 of 8:
#   class 0: 4 of 4 right, class 1: 1 of 2, class 2: 0 of 2.
# top-1 = 5/8; macro = (1 + 1/2 + 0) / 3 = 1/2.
CLASS_LABELS = [0, 0, 0, 0, 1, 1, 2, 2]
CLASS_PREDICTIONS = [0, 0, 0, 0, 0, 1, 0, 0]


def test_classification_metrics_by_hand_from_labels_and_from_logits():
    expected = {
        "top1": 5 / 8,
        "macro_accuracy": 1 / 2,
        "per_class": [1, 1 / 2, 0],
        "num_samples": 8,
    }
    assert classification_metrics(CLASS_PREDICTIONS, CLASS_LABELS) == expected
    logits = torch.full((8, 3), -1.0)
    logits[torch.arange(8), torch.tensor(CLASS_PREDICTIONS)] = 2.0
    assert classification_metrics(logits, torch.tensor(CLASS_LABELS), num_classes=3) == expected
    assert classification_metrics(logits.numpy(), np.array(CLASS_LABELS)) == expected


def test_macro_accuracy_averages_over_the_classes_in_the_labels_only():
    # Class 3 is predicted but never true: it does not enter the mean.
    metrics = classification_metrics([0, 3, 1], [0, 0, 1])
    assert metrics["top1"] == pytest.approx(2 / 3)
    assert metrics["macro_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["per_class"] == [1 / 2, 1]  # classes 0 and 1, in label order


def test_macro_accuracy_matches_sklearn_balanced_accuracy():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(0)
    labels = rng.choice(6, size=300, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    logits = rng.normal(size=(300, 6))
    logits[np.arange(300), labels] += 1.0
    metrics = classification_metrics(logits, labels)
    predictions = logits.argmax(axis=1)
    assert metrics["top1"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["macro_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert metrics["top1"] != pytest.approx(metrics["macro_accuracy"], abs=1e-3)


def test_classification_metrics_errors():
    with pytest.raises(ValueError, match="3 columns but num_classes=4"):
        classification_metrics(torch.zeros(2, 3), [0, 1], num_classes=4)
    with pytest.raises(ValueError, match="labels range from 0 to 3 but.*num_classes=3"):
        classification_metrics(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError, match="predictions range from 0 to 5"):
        classification_metrics([0, 5], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="integer classes"):
        classification_metrics(torch.tensor([0.0, 1.0]), [0, 1])
    with pytest.raises(ValueError, match="integer classes"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="one label per"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(torch.tensor([[0.0, float("nan")]]), [0])


def test_exclude_same_index_treats_references_as_clean_copies_of_the_queries():
    x, labels = clustered(num_points=60, seed=3)
    # The queries themselves as references, own copy excluded: exactly the self-search.
    paired = retrieval_metrics(x, labels, reference=x, reference_labels=labels,
                               exclude_same_index=True)  # fmt: skip
    assert paired == retrieval_metrics(x, labels)
    # Without the exclusion every query finds itself first.
    assert retrieval_metrics(x, labels, reference=x, reference_labels=labels)["recall@1"] == 1.0
    # Slightly altered queries: each one's clean copy is its nearest reference, and is skipped.
    noisy = x + 1e-5 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    scores = retrieval_metrics(noisy, labels, ks=(1,), reference=x, reference_labels=labels,
                               exclude_same_index=True)  # fmt: skip
    assert scores["recall@1"] == pytest.approx(paired["recall@1"])
    with pytest.raises(ValueError, match="copy of query i"):
        retrieval_metrics(x[:10], labels[:10], reference=x, reference_labels=labels,
                          exclude_same_index=True)  # fmt: skip
    with pytest.raises(ValueError, match="copy of query i"):
        retrieval_metrics(x, labels, reference=x, reference_labels=np.roll(labels, 1),
                          exclude_same_index=True)  # fmt: skip
