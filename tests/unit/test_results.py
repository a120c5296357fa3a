import json
import math

import numpy as np
import pytest
import torch

from utils_cv.common import results
from utils_cv.common.results import load_metrics, record_metrics


def test_round_trip_converts_numpy_and_torch_scalars(tmp_path):
    path = record_metrics(
        tmp_path / "out" / "run",
        {
            "recall@1": np.float32(0.25),
            "num_queries": np.int64(12),
            "loss": torch.tensor(1.5),
            "epochs": torch.tensor(3),
            "preset": "smoke",
            "converged": np.bool_(True),
            "per_seed": [np.float64(0.5), torch.tensor(0.75)],
            "note": None,
        },
    )
    assert path == tmp_path / "out" / "run" / "metrics.json"
    loaded = load_metrics(tmp_path / "out" / "run")
    assert loaded == {
        "recall@1": 0.25,
        "num_queries": 12,
        "loss": 1.5,
        "epochs": 3,
        "preset": "smoke",
        "converged": True,
        "per_seed": [0.5, 0.75],
        "note": None,
    }
    assert type(loaded["num_queries"]) is int and type(loaded["epochs"]) is int
    assert type(loaded["converged"]) is bool


def test_merges_nested_dicts_and_prefix(tmp_path):
    record_metrics(tmp_path, {"a": 1, "softmax": {"recall@1": 0.1, "map@r": 0.05}})
    record_metrics(tmp_path, {"recall@1": 0.2, "recall@2": 0.3}, prefix="softmax")
    record_metrics(tmp_path, {"a": 2, "b": {"c": 3}})
    assert load_metrics(tmp_path) == {
        "a": 2,
        "softmax": {"recall@1": 0.2, "map@r": 0.05, "recall@2": 0.3},
        "b": {"c": 3},
    }


def test_non_dict_value_replaces_dict(tmp_path):
    record_metrics(tmp_path, {"x": {"y": 1}})
    record_metrics(tmp_path, {"x": 5})
    assert load_metrics(tmp_path) == {"x": 5}


@pytest.mark.parametrize(
    "bad", [float("nan"), math.inf, np.float32("nan"), torch.tensor(-math.inf)]
)
def test_non_finite_rejected_naming_key_and_old_file_kept(tmp_path, bad):
    record_metrics(tmp_path, {"loss": 1.0})
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match=r"'run/train/loss'"):
        record_metrics(tmp_path, {"ok": 1.0, "train": {"loss": bad}}, prefix="run")
    assert (tmp_path / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_non_finite_in_list_names_position(tmp_path):
    with pytest.raises(ValueError, match=r"'losses\[1\]'"):
        record_metrics(tmp_path, {"losses": [1.0, float("nan")]})
    assert not (tmp_path / "metrics.json").exists()


def test_interrupted_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    record_metrics(tmp_path, {"recall@1": 0.5})
    before = (tmp_path / "metrics.json").read_text()

    def dump_then_die(data, file, **kwargs):
        file.write('{"recall@1": 0.')
        raise KeyboardInterrupt

    monkeypatch.setattr(results.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        record_metrics(tmp_path, {"recall@1": 0.7})
    monkeypatch.undo()
    assert (tmp_path / "metrics.json").read_text() == before
    assert json.loads(before) == {"recall@1": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize(
    "metrics, error, pattern",
    [
        ({"embeddings": torch.zeros(3)}, TypeError, "'embeddings'.*shape \\(3,\\)"),
        ({"values": np.zeros((2, 2))}, TypeError, "'values'.*shape \\(2, 2\\)"),
        ({"model": object()}, TypeError, "'model' has type object"),
        ({1: 0.5}, TypeError, "key 1"),
    ],
)
def test_unsupported_values_rejected(tmp_path, metrics, error, pattern):
    with pytest.raises(error, match=pattern):
        record_metrics(tmp_path, metrics)
    assert not (tmp_path / "metrics.json").exists()


def test_empty_prefix_rejected(tmp_path):
    with pytest.raises(ValueError, match="prefix"):
        record_metrics(tmp_path, {"a": 1}, prefix="")


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="record_metrics"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_metrics(tmp_path)
    with pytest.raises(ValueError, match="not valid JSON"):
        record_metrics(tmp_path, {"a": 1})
    assert (tmp_path / "metrics.json").read_text() == "{broken"


RUNS = [
    {"method": "softmax", "seed": 0, "recall@1": 0.186, "map@r": 0.12},
    {"method": "triplet", "seed": 0, "recall@1": 0.10, "map@r": 0.05},
    {"method": "softmax", "seed": 1, "recall@1": 0.166, "map@r": 0.10},
    {"method": "softmax", "seed": 2, "recall@1": 0.175, "map@r": 0.11},
]


def test_seed_summary_gives_mean_sample_std_and_each_seed_in_order():
    summary = results.seed_summary(RUNS, ["recall@1", "map@r"])
    assert list(summary) == ["softmax", "triplet"]
    softmax = summary["softmax"]
    assert softmax["recall@1"] == pytest.approx(0.1757, abs=1e-4)  # (0.186+0.166+0.175)/3
    assert softmax["recall@1_std"] == pytest.approx(0.0100, abs=1e-4)  # ddof = 1
    assert softmax["map@r"] == 0.11 and softmax["map@r_std"] == 0.01
    assert softmax["recall@1_by_seed"] == [0.186, 0.166, 0.175]
    # One run: a mean, no standard deviation.
    assert summary["triplet"] == {"recall@1": 0.1, "map@r": 0.05, "recall@1_by_seed": [0.1]}


def test_seed_table_shows_mean_plus_minus_std_and_the_seeds():
    table = results.seed_table(RUNS, ["recall@1", "map@r"])
    assert list(table.index) == ["softmax", "triplet"]
    assert table.loc["softmax", "recall@1"] == "0.176 ± 0.010"
    assert table.loc["softmax", "recall@1 by seed"] == "0.186 / 0.166 / 0.175"
    assert table.loc["triplet", "map@r"] == "0.050"


def test_rounded_reaches_into_dicts_lists_and_tensors():
    value = {"a": 0.123456, "b": [1 / 3, 2], "c": {"d": torch.tensor(0.98765)}, "e": "x"}
    assert results.rounded(value, digits=3) == {
        "a": 0.123,
        "b": [0.333, 2],
        "c": {"d": 0.988},
        "e": "x",
    }


def test_seed_summary_names_a_missing_key_and_the_fix():
    with pytest.raises(KeyError, match=r"run 1 has no \['map@r'\].*each of the columns"):
        results.seed_summary([RUNS[0], {"method": "x", "seed": 0, "recall@1": 0.1}], ["map@r"])


def test_a_measure_that_does_not_apply_to_a_group_stays_none_and_shows_a_dash():
    runs = [
        {"method": "batch_hard", "seed": 0, "recall@1": 0.3, "ratio": None},
        {"method": "batch_hard+EE", "seed": 0, "recall@1": 0.2, "ratio": 0.4},
        {"method": "batch_hard", "seed": 1, "recall@1": 0.4, "ratio": None},
        {"method": "batch_hard+EE", "seed": 1, "recall@1": 0.3, "ratio": 0.6},
    ]
    summary = results.seed_summary(runs, ["recall@1", "ratio"])
    assert summary["batch_hard"]["ratio"] is None and "ratio_std" not in summary["batch_hard"]
    assert summary["batch_hard+EE"]["ratio"] == 0.5
    table = results.seed_table(runs, ["recall@1", "ratio"])
    assert table.loc["batch_hard", "ratio"] == "—"
    assert table.loc["batch_hard+EE", "ratio"] == "0.500 ± 0.141"


def test_a_measure_missing_from_some_runs_of_a_group_is_refused():
    runs = [
        {"method": "m", "seed": 0, "recall@1": 0.3, "ratio": None},
        {"method": "m", "seed": 1, "recall@1": 0.4, "ratio": 0.5},
    ]
    with pytest.raises(ValueError, match="None in all of them"):
        results.seed_summary(runs, ["ratio"])
