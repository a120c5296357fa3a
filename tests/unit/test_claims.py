"""The claims table's rule and its rows, on records made up to give known verdicts."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest

from utils_cv.similarity import claims, plot
from utils_cv.similarity.presets import IMAGENET, SCRATCH


@pytest.mark.parametrize(
    ("a", "b", "matches", "expected"),
    [
        ([0.40, 0.41, 0.42], [0.30, 0.31, 0.32], False, claims.REPRODUCED),
        ([0.30, 0.31, 0.32], [0.40, 0.41, 0.42], False, claims.NOT_REPRODUCED),
        ([0.40, 0.45, 0.35], [0.38, 0.43, 0.33], False, claims.CANNOT_TELL),  # inside the spread
        (
            [0.305, 0.306, 0.307],
            [0.300, 0.301, 0.302],
            False,
            claims.CANNOT_TELL,
        ),  # under the floor
        ([0.38, 0.43, 0.33], [0.40, 0.45, 0.35], True, claims.REPRODUCED),  # matches
        ([0.30, 0.31, 0.32], [0.40, 0.41, 0.42], True, claims.NOT_REPRODUCED),
    ],
)
def test_the_verdict_rule(a, b, matches, expected):
    diff, threshold, outcome = claims.verdict(a, b, floor=0.01, matches=matches)
    assert outcome == expected
    assert diff == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert threshold >= 0.01


def test_the_threshold_is_twice_the_pooled_std():
    a, b = [0.5, 0.6, 0.7], [0.1, 0.1, 0.1]  # std 0.1 and 0
    _, threshold, _ = claims.verdict(a, b, floor=0.01)
    assert threshold == pytest.approx(2 * (0.1**2 / 2) ** 0.5)


def test_one_seed_cannot_tell_however_large_the_gap():
    assert claims.verdict([0.9], [0.1], floor=0.01)[2] == "cannot tell (one seed)"
    with pytest.raises(ValueError, match="at least one"):
        claims.verdict([], [0.1], floor=0.01)


def test_epochs_to_counts_from_one():
    run = {"history": [{"val_recall@1": v} for v in (0.1, 0.5, 0.95, 1.0, 0.9)]}
    assert claims.epochs_to(run) == 3  # the first epoch at 90 % of the best (1.0)


def record(method, setting, seed, recall, val=None, distance=1.0, ee_base=None, seconds=1.0,
           gap=0.1, dims=128):  # fmt: skip
    history = [{"val_recall@1": v, "loss_selection_ratio": s}
               for v, s in ((0.1, 0.8), (recall, 0.5))]  # fmt: skip
    out = {
        "method": method, "setting": setting, "seed": seed, "ee_base": ee_base,
        "metrics": {"recall@1": recall, "mean_test_distance": distance},
        "best_val_recall@1": recall if val is None else val, "history": history,
        "seconds_per_epoch": seconds, "bytes_per_image": 4 * dims,
    }  # fmt: skip
    if method.startswith("norm_softmax"):
        out |= {"binary_metrics": {"recall@1": recall - gap}, "binary_bytes_per_image": 16}
    return out


def made_up(setting):
    """Batch-hard far ahead of the other triplets and collapsed; ProxyNCA behind; EE on
    multi-similarity (best on validation) a little ahead, inside the noise."""
    recalls = {
        "batch_all": [0.30, 0.31, 0.32], "semi_hard": [0.30, 0.30, 0.31],
        "batch_hard": [0.40, 0.41, 0.42], "multi_similarity": [0.35, 0.40, 0.45],
        "proxy_nca": [0.33, 0.34, 0.35], "norm_softmax": [0.43, 0.44, 0.45],
        "ee": [0.36, 0.41, 0.46],
        # the ablations
        "proxy_nca-half_proxies": [0.45, 0.46, 0.47], "proxy_nca-proxy_lr_100": [0.20, 0.21, 0.22],
        "norm_softmax-no_layer_norm": [0.40, 0.41, 0.42], "norm_softmax-t1": [0.43, 0.44, 0.47],
        "norm_softmax-s2": [0.50, 0.51, 0.52], "norm_softmax-s4": [0.55, 0.56, 0.57],
        "norm_softmax-s8": [0.30, 0.31, 0.32], "norm_softmax-4x_dims": [0.50, 0.50, 0.50],
        "ee-no_projection": [0.20, 0.21, 0.22], "ee-8_points": [0.36, 0.41, 0.46],
    }  # fmt: skip
    # best on validation, not on test: multi-similarity among the bases, S = 2 among 2 and 4
    val = {"multi_similarity": 0.9, "norm_softmax-s2": 0.6, "norm_softmax-s4": 0.4}
    out = []
    for method, values in recalls.items():
        for seed, value in enumerate(values):
            out.append(record(method, setting, seed, value, val=val.get(method),
                              distance=0.01 if method == "batch_hard" else 1.0,
                              ee_base="multi_similarity" if method.startswith("ee") else None,
                              seconds=1.5 if method == "ee" else 1.0,
                              gap=0.02 if method == "norm_softmax-4x_dims" else 0.1,
                              dims=512 if method == "norm_softmax-4x_dims" else 128))  # fmt: skip
    return out


def test_the_claims_table_computes_each_verdict_from_the_records():
    table = claims.claims_table(made_up(SCRATCH) + made_up(IMAGENET))
    assert len(table) == 17
    verdicts = table[f"{SCRATCH}: verdict"]
    row = {int(claim.split(".")[0]): v for claim, v in verdicts.items()}
    assert row[1] == claims.REPRODUCED  # collapsed from scratch...
    assert table[f"{IMAGENET}: verdict"].iloc[0] == claims.NOT_REPRODUCED  # ...and from ImageNet
    assert row[2] == claims.REPRODUCED
    assert row[3] == claims.NOT_REPRODUCED  # ProxyNCA behind the best triplet (batch-hard)
    assert "batch_hard" in table[f"{SCRATCH}: ours"].iloc[2]  # compared with the best one
    # the difference beside the threshold it had to pass, as verdict() computed them
    runs = claims._by_method(made_up(SCRATCH), SCRATCH)
    diff, threshold, _ = claims.verdict(*(claims._values(runs[m], claims._recall)
                                          for m in ("proxy_nca", "batch_hard")), floor=0.01)  # fmt: skip
    assert table[f"{SCRATCH}: ours"].iloc[2].endswith(f"({diff:+.3f} against {threshold:.3f})")
    assert row[7] == claims.REPRODUCED
    assert row[14] == claims.CANNOT_TELL  # EE vs multi-similarity: inside the spread
    assert row[15] == claims.REPRODUCED  # selection ratio 0.8 -> 0.5
    assert row[17] == claims.NOT_REPRODUCED  # 1.5 times the base's time, on every seed
    assert row[12].startswith("size reproduced")
    # the ablations' claims
    assert row[5] == claims.REPRODUCED  # 0.5 proxies per class ahead of batch-hard
    assert row[6] == claims.NOT_REPRODUCED  # proxies at 100 times the rate behind
    assert row[8] == claims.REPRODUCED  # without LayerNorm 3 points behind
    assert row[9] == claims.REPRODUCED  # S = 2 (chosen on validation) beats S ~ 1 and S = 8
    ours = table[f"{SCRATCH}: ours"]
    assert "norm_softmax-s2" in ours.iloc[8] and "norm_softmax-s4" not in ours.iloc[8]
    assert row[10] == claims.CANNOT_TELL  # temperature 1 inside the spread of 0.05
    assert row[11] == claims.REPRODUCED  # float - binary: 0.1 at 128-d, 0.02 at 512-d
    assert "128-d" in ours.iloc[10] and "512-d" in ours.iloc[10]
    assert row[16] == claims.REPRODUCED  # the projection matters; 8 points match 2
    assert row[13].startswith(claims.NOT_MEASURED)


def test_a_claim_of_several_parts_fails_when_one_part_fails():
    runs = [r for r in made_up(SCRATCH) if r["method"] != "ee-8_points"]
    runs += [record("ee-8_points", SCRATCH, s, 0.1, ee_base="multi_similarity") for s in range(3)]
    table = claims.claims_table(runs, settings=(SCRATCH,))
    assert table[f"{SCRATCH}: verdict"].iloc[15] == claims.NOT_REPRODUCED  # 8 points fall behind
    assert claims._combined([claims.REPRODUCED, claims.CANNOT_TELL]) == claims.CANNOT_TELL
    assert claims._combined([claims.CANNOT_TELL, claims.NOT_REPRODUCED]) == claims.NOT_REPRODUCED
    # EE runs on two bases cannot be compared: the claim says why instead of judging
    other = [dict(r, ee_base="batch_hard") if r["method"] == "ee-no_projection" else r
             for r in made_up(SCRATCH)]  # fmt: skip
    verdict = claims.claims_table(other, settings=(SCRATCH,))[f"{SCRATCH}: verdict"].iloc[15]
    assert verdict.startswith(claims.NOT_MEASURED) and "different bases" in verdict


def test_a_setting_without_runs_is_not_measured():
    table = claims.claims_table(made_up(SCRATCH))
    assert set(table[f"{IMAGENET}: verdict"]) <= {
        f"{claims.NOT_MEASURED} (runs missing)",
        *(v for v in table[f"{IMAGENET}: verdict"] if v.startswith(claims.NOT_MEASURED)),
    }


def test_plot_seed_bars_draws_a_bar_per_method_and_setting():
    values = {SCRATCH: {"a": [0.3, 0.4], "b": [0.5]}, IMAGENET: {"a": [0.6, 0.7]}}
    fig = plot.plot_seed_bars(values)
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == 3  # b has no bar from ImageNet
    with pytest.raises(ValueError, match="empty"):
        plot.plot_seed_bars({})


def test_a_claim_against_the_best_of_a_group_needs_the_whole_group():
    partial = [r for r in made_up(SCRATCH) if r["method"] != "multi_similarity"]
    table = claims.claims_table(partial, settings=(SCRATCH,))
    row = {int(c.split(".")[0]): v for c, v in table[f"{SCRATCH}: verdict"].items()}
    assert row[7] == f"{claims.NOT_MEASURED} (runs missing)"  # NormSoftmax vs the best of all
    assert row[2] == claims.REPRODUCED  # batch-hard vs batch-all and semi-hard: all there
