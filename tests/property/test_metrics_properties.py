"""Properties of `retrieval_metrics`: ranges, invariances, and a brute-force reference.

Ties: equal distances come in reference order (`search._smallest`), a documented and
deterministic rule, so with ties the metrics depend on the order of the rows: two references
at the same distance, one of the query's class and one not, give Recall@1 = 1 or 0 depending on
which comes first. The brute-force reference follows that rule and is checked on inputs full of
ties (duplicate rows, small integer coordinates); the permutation invariances are checked on
inputs made free of ties (`without_ties`).

Embeddings are small integers, so every score the search computes in float32 is an exact
integer and the reference can compare exact integer distances.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from utils_cv.similarity import metrics, search
from utils_cv.similarity.metrics import retrieval_metrics

MAX_ROWS = 30
MAX_DIM = 8
# Coordinates in [-2, 2]: few distinct distances, so ties are everywhere.
COORDINATE = st.integers(-2, 2)
# Numbers whose base-3 digits are all 0 or 1: no three of them in arithmetic progression
# (no a + b = 2c), so for each c the distances |c - a| to all the others differ. 32 of them,
# all below 243.
NO_PROGRESSION = [n for n in range(243) if "2" not in np.base_repr(n, 3)]


def rows(draw, num_rows: int, dim: int) -> np.ndarray:
    """(num_rows, dim) int64 coordinates in [-2, 2], some rows copied over others."""
    x = draw(arrays(np.int64, (num_rows, dim), elements=COORDINATE))
    copies = st.tuples(st.integers(0, num_rows - 1), st.integers(0, num_rows - 1))
    for source, target in draw(st.lists(copies, max_size=num_rows // 2)):
        x[target] = x[source]
    return x


def class_labels(draw, num_rows: int, max_classes: int | None = None) -> np.ndarray:
    num_classes = draw(st.integers(1, max_classes or num_rows))
    return draw(arrays(np.int64, num_rows, elements=st.integers(0, num_classes - 1)))


@st.composite
def self_search_sets(draw, min_rows: int = 2, max_rows: int = MAX_ROWS):
    """(embeddings (N, D) int64, labels (N,), ks): at least one label shared by two rows."""
    num_rows = draw(st.integers(min_rows, max_rows))
    x = rows(draw, num_rows, draw(st.integers(1, MAX_DIM)))
    labels = class_labels(draw, num_rows)
    assume(len(np.unique(labels)) < num_rows)
    ks = draw(st.lists(st.integers(1, num_rows - 1), min_size=1, max_size=4))
    return x, labels, ks


@st.composite
def query_reference_sets(draw, max_queries: int = 12, max_references: int = 20):
    """(query, query_labels, reference, reference_labels, ks), one query with a positive."""
    dim = draw(st.integers(1, MAX_DIM))
    num_queries = draw(st.integers(1, max_queries))
    num_references = draw(st.integers(1, max_references))
    x = rows(draw, num_queries + num_references, dim)  # copies across the two sets too
    labels = class_labels(draw, num_queries + num_references, max_classes=6)
    query_labels, reference_labels = labels[:num_queries], labels[num_queries:]
    assume(np.isin(query_labels, reference_labels).any())
    ks = draw(st.lists(st.integers(1, num_references), min_size=1, max_size=4))
    return x[:num_queries], query_labels, x[num_queries:], reference_labels, ks


def without_ties(*parts: np.ndarray) -> list[np.ndarray]:
    """The rows of `parts` (int coordinates in [-2, 2]) made free of ties, in float32.

    Each row gets 243 times its coordinates and one more coordinate, a distinct number of
    `NO_PROGRESSION`: squared distances become 243^2 * old + (c_q - c_r)^2 with the last term
    below 243^2 and different for every reference of a query. All scores stay exact integers
    in float32 (below 2^24).
    """
    x = np.concatenate(parts)
    assert len(x) <= len(NO_PROGRESSION)
    extra = np.array(NO_PROGRESSION[: len(x)])[:, None]
    x = np.concatenate([243 * x, extra], axis=1).astype(np.float32)
    return np.split(x, np.cumsum([len(part) for part in parts])[:-1])


def assert_no_ties(query: np.ndarray, reference: np.ndarray) -> None:
    squared = ((query[:, None].astype(np.int64) - reference[None].astype(np.int64)) ** 2).sum(2)
    for row in squared:
        assert len(np.unique(row)) == len(row)


def brute_force(query, query_labels, reference, reference_labels, ks, exclude_same_index):
    """The metrics by a loop over queries: exact distances, ties in reference order."""
    recalls, map_at_r, r_precision, skipped = {k: [] for k in ks}, [], [], 0
    for i, (q, label) in enumerate(zip(query, query_labels, strict=True)):
        candidates = [j for j in range(len(reference)) if not (exclude_same_index and j == i)]
        distances = [int(((q - reference[j]) ** 2).sum()) for j in candidates]
        ranked = [j for _, j in sorted(zip(distances, candidates, strict=True))]
        relevant = [reference_labels[j] == label for j in ranked]
        r = sum(relevant)
        if r == 0:
            skipped += 1
            continue
        for k in ks:
            recalls[k].append(any(relevant[:k]))
        hits, precision_sum = 0, 0.0
        for position, is_relevant in enumerate(relevant[:r], start=1):
            if is_relevant:
                hits += 1
                precision_sum += hits / position
        map_at_r.append(precision_sum / r)
        r_precision.append(hits / r)
    results = {f"recall@{k}": float(np.mean(recalls[k])) for k in ks}
    results["map@r"], results["r_precision"] = np.mean(map_at_r), np.mean(r_precision)
    results["num_queries"], results["num_skipped_queries"] = len(map_at_r), skipped
    return results


def assert_same_metrics(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# How the search runs: dtype (float32 goes through faiss's heaps, float64 through
# `_smallest`), chunk size, and the tile of `_heap_chunks` / `_first_relevant_ranks`;
# SEARCHED_K = 0 sends the queries without a positive among their first max R neighbours to
# the second pass, which the small sets here would otherwise never reach.
SEARCH_PLANS = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([np.float32, np.float64]),
        "metric": st.sampled_from(["euclidean", "squared_euclidean"]),
        "chunk_size": st.none() | st.integers(1, MAX_ROWS),
        "tile": st.sampled_from([search.TILE, 1, 2, 3, 7]),
        "searched_k": st.sampled_from([metrics.SEARCHED_K, 0]),
    }
)


def run_with_plan(plan, query, labels, ks, **kwargs):
    with (
        mock.patch.object(search, "TILE", plan["tile"]),
        mock.patch.object(metrics, "TILE", plan["tile"]),
        mock.patch.object(metrics, "SEARCHED_K", plan["searched_k"]),
    ):
        if "reference" in kwargs:
            kwargs["reference"] = kwargs["reference"].astype(plan["dtype"])
        return retrieval_metrics(
            query.astype(plan["dtype"]),
            labels,
            ks,
            metric=plan["metric"],
            chunk_size=plan["chunk_size"],
            **kwargs,
        )


@given(self_search_sets(), SEARCH_PLANS)
def test_all_against_all_equals_a_brute_force_loop_with_ties_in_reference_order(data, plan):
    x, labels, ks = data
    expected = brute_force(x, labels, x, labels, ks, exclude_same_index=True)
    assert_same_metrics(run_with_plan(plan, x, labels, ks), expected)


@given(query_reference_sets(), SEARCH_PLANS)
def test_query_against_reference_equals_a_brute_force_loop_with_ties_in_reference_order(data, plan):
    query, query_labels, reference, reference_labels, ks = data
    expected = brute_force(query, query_labels, reference, reference_labels, ks, False)
    actual = run_with_plan(
        plan, query, query_labels, ks, reference=reference, reference_labels=reference_labels
    )
    assert_same_metrics(actual, expected)


@given(self_search_sets(), st.sampled_from(["euclidean", "squared_euclidean", "cosine"]))
def test_every_metric_lies_in_zero_to_one(data, metric):
    x, labels, ks = data
    results = retrieval_metrics(x.astype(np.float32), labels, ks, metric=metric)
    for key in [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]:
        assert 0 <= results[key] <= 1, key


@given(self_search_sets(min_rows=3))
def test_recall_at_k_is_non_decreasing_in_k(data):
    x, labels, _ = data
    ks = range(1, len(x))
    results = retrieval_metrics(x.astype(np.float32), labels, ks)
    recalls = [results[f"recall@{k}"] for k in ks]
    assert recalls == sorted(recalls)


@given(self_search_sets())
def test_map_at_r_is_at_most_r_precision(data):
    x, labels, ks = data
    results = retrieval_metrics(x.astype(np.float32), labels, ks)
    assert results["map@r"] <= results["r_precision"] + 1e-12


@st.composite
def relabellings(draw, labels: np.ndarray):
    """A bijection of the label values, to other integers or to strings."""
    classes = np.unique(labels)
    values = st.integers(-(2**40), 2**40) | st.text(min_size=1, max_size=3)
    new = draw(st.lists(values, min_size=len(classes), max_size=len(classes), unique=True))
    if len({type(value) for value in new}) > 1:
        new = [str(value) for value in new]  # one type: numpy compares them as one array
        assume(len(set(new)) == len(classes))
    mapping = dict(zip(classes.tolist(), new, strict=True))
    return np.array([mapping[label] for label in labels.tolist()])


@given(self_search_sets(), st.data())
def test_invariant_to_relabelling_the_classes(data, draw):
    """Any bijection of the label values; ties allowed, since the rows keep their order."""
    x, labels, ks = data
    relabelled = draw.draw(relabellings(labels))
    x = x.astype(np.float32)
    assert retrieval_metrics(x, relabelled, ks) == retrieval_metrics(x, labels, ks)


@given(query_reference_sets(), st.data())
def test_query_against_reference_invariant_to_relabelling_the_classes(data, draw):
    query, query_labels, reference, reference_labels, ks = data
    labels = np.concatenate([query_labels, reference_labels])
    relabelled = draw.draw(relabellings(labels))
    query, reference = query.astype(np.float32), reference.astype(np.float32)

    def run(labels):
        return retrieval_metrics(
            query,
            labels[: len(query)],
            ks,
            reference=reference,
            reference_labels=labels[len(query) :],
        )

    assert run(relabelled) == run(labels)


@given(self_search_sets(), st.randoms(use_true_random=False))
def test_all_against_all_without_ties_invariant_to_permuting_the_rows(data, random):
    """Queries and references are the same rows here, so one permutation moves both."""
    x, labels, ks = data
    (x,) = without_ties(x)
    assert_no_ties(x, x)
    order = np.array(random.sample(range(len(x)), len(x)))
    assert_same_metrics(
        retrieval_metrics(x[order], labels[order], ks),
        retrieval_metrics(x, labels, ks),
    )


@given(query_reference_sets(), st.randoms(use_true_random=False))
def test_query_against_reference_without_ties_invariant_to_permuting_queries_or_references(
    data, random
):
    query, query_labels, reference, reference_labels, ks = data
    query, reference = without_ties(query, reference)
    assert_no_ties(query, reference)
    queries = np.array(random.sample(range(len(query)), len(query)))
    references = np.array(random.sample(range(len(reference)), len(reference)))
    expected = retrieval_metrics(
        query, query_labels, ks, reference=reference, reference_labels=reference_labels
    )
    permuted_queries = retrieval_metrics(
        query[queries],
        query_labels[queries],
        ks,
        reference=reference,
        reference_labels=reference_labels,
    )
    permuted_references = retrieval_metrics(
        query,
        query_labels,
        ks,
        reference=reference[references],
        reference_labels=reference_labels[references],
    )
    assert_same_metrics(permuted_queries, expected)
    assert_same_metrics(permuted_references, expected)


@given(self_search_sets(), SEARCH_PLANS)
def test_all_against_all_equals_the_references_as_copies_of_the_queries_with_own_row_excluded(
    data, plan
):
    x, labels, ks = data
    copies = run_with_plan(
        plan, x, labels, ks, reference=x, reference_labels=labels, exclude_same_index=True
    )
    assert copies == run_with_plan(plan, x, labels, ks)


@given(self_search_sets(min_rows=3, max_rows=12))  # one search per row: kept small
def test_all_against_all_equals_each_query_against_all_other_rows_averaged(data):
    """Removing row i keeps the other rows in order, so ties come out the same."""
    x, labels, ks = data
    x = x.astype(np.float32)
    expected = retrieval_metrics(x, labels, ks)
    per_query = []
    for i in range(len(x)):
        others = np.arange(len(x)) != i
        if labels[i] not in labels[others]:
            continue  # no positive: not scored in either form
        per_query.append(
            retrieval_metrics(
                x[i : i + 1],
                labels[i : i + 1],
                ks,
                reference=x[others],
                reference_labels=labels[others],
            )
        )
    assert len(per_query) == expected["num_queries"]
    for key in [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]:
        mean = np.mean([results[key] for results in per_query])
        assert expected[key] == pytest.approx(mean, rel=1e-12, abs=1e-12), key


@given(
    st.integers(2, MAX_ROWS).flatmap(
        lambda n: st.tuples(
            arrays(np.int64, (n, 3), elements=COORDINATE),
            st.lists(st.integers(), min_size=n, max_size=n, unique=True),
        )
    )
)
def test_lone_labels_only_is_an_error_saying_no_query_can_score(data):
    x, labels = data
    with pytest.raises(ValueError, match="no query has a same-class item"):
        retrieval_metrics(x.astype(np.float32), np.array(labels), 1)


def test_searched_k_plan_reaches_the_second_pass():
    """SEARCH_PLANS's searched_k = 0 is only useful if it runs `_first_relevant_ranks`."""
    x = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    with (
        mock.patch.object(metrics, "SEARCHED_K", 0),
        mock.patch.object(
            metrics, "_first_relevant_ranks", wraps=metrics._first_relevant_ranks
        ) as second_pass,
    ):
        results = retrieval_metrics(x, [0, 1, 1, 0], (1, 3))
    assert second_pass.called
    assert results["recall@1"] == 0.25 and results["recall@3"] == 1.0
