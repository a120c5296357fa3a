"""The papers' claims (METHODS.md, "The claims to test") against the stored comparison.

``claims_table(records)`` gives one row per claim: the paper's figure, ours in each setting
(mean ± std over seeds) and a verdict computed by one rule (``verdict``), never chosen by
hand. The claims about one setting of a method (0.5 proxies per class, LayerNorm, the
temperature, ...) are judged on its ablations (``compare.ABLATIONS``), trained under the same
protocol. A claim the comparison cannot answer says so and names the notebook that studies
it: "not measured here" is a verdict too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from utils_cv.similarity.compare import COLLAPSED
from utils_cv.similarity.presets import IMAGENET, SCRATCH

REPRODUCED, NOT_REPRODUCED, CANNOT_TELL = "reproduced", "not reproduced", "cannot tell"
NOT_MEASURED = "not measured here"
# The rule, as the notebook and docs/results.md state it.
RULE = (
    "A claim that A beats B is reproduced when A's mean exceeds B's by more than twice their "
    "pooled seed standard deviation, sqrt((s_A² + s_B²) / 2), and by at least a floor (0.01 "
    "of Recall@1 or of a share, one epoch); not reproduced when B's mean exceeds A's by as "
    "much; cannot tell in between. A claim that A matches or beats B is not reproduced only "
    "when B is ahead by that much. One seed can tell nothing. B is the best of its group on "
    "the validation classes. A claim of several parts is reproduced when every part is, and "
    "not reproduced when any part is not. A "
    f"collapse is a mean test distance below {COLLAPSED} on every seed (random unit vectors "
    "lie about 1.41 apart). EE costs little when its seconds per epoch match its base's by "
    "the same rule, with 10 % of the base's time as the floor."
)
TRIPLETS = ("batch_all", "semi_hard", "batch_hard")
PAIR_AND_PROXY = (*TRIPLETS, "multi_similarity", "proxy_nca")


def verdict(
    a: Sequence[float], b: Sequence[float], floor: float, matches: bool = False
) -> tuple[float, float, str]:
    """(mean(a) - mean(b), the threshold, the verdict) for the claim "a beats b" (or, with
    ``matches``, "a matches or beats b"), by the rule in ``RULE``.

    The threshold is max(2 * pooled std, floor). With one value on a side there is no
    spread to judge the difference against: "cannot tell (one seed)".
    """
    if not len(a) or not len(b):
        raise ValueError("each side of a claim needs at least one value")
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:  # no spread to judge the difference against
        return diff, floor, f"{CANNOT_TELL} (one seed)"
    spreads = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in (a, b)]
    threshold = max(2 * math.sqrt((spreads[0] ** 2 + spreads[1] ** 2) / 2), floor)
    if diff < -threshold:
        return diff, threshold, NOT_REPRODUCED
    if matches or diff > threshold:
        return diff, threshold, REPRODUCED
    return diff, threshold, CANNOT_TELL


def _by_method(records: Iterable[Mapping[str, Any]], setting: str) -> dict[str, list[Mapping]]:
    grouped: dict[str, list[Mapping]] = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        if record["setting"] == setting:
            grouped.setdefault(record["method"], []).append(record)
    return grouped


def _values(runs: Sequence[Mapping], get: Callable[[Mapping], float]) -> list[float]:
    return [float(get(r)) for r in runs]


def _recall(r: Mapping) -> float:
    return r["metrics"]["recall@1"]


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{np.mean(values):.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def epochs_to(run: Mapping, share: float = 0.9) -> int:
    """The first epoch (counted from 1) whose validation Recall@1 reaches ``share`` of the
    run's best: how fast a method converges, in the units of ProxyNCA's figure."""
    scores = [h["val_recall@1"] for h in run["history"]]
    best = max(scores)
    return next(i + 1 for i, s in enumerate(scores) if s >= share * best)


def _margin(diff: float, threshold: float) -> str:
    """The difference beside the threshold it must pass, so that a reader sees how close a
    verdict was: "+0.014 against 0.013"."""
    return f"{diff:+.3f} against {threshold:.3f}"


def _best(runs: Mapping[str, Sequence[Mapping]], names: Sequence[str]) -> str:
    """The method among ``names`` with the best mean validation Recall@1 (test unused)."""
    absent = [n for n in names if n not in runs]
    if absent:  # a claim against "the best of" a group needs the whole group
        raise KeyError(f"no stored runs of {absent}")
    return max(names, key=lambda n: np.mean(_values(runs[n], lambda r: r["best_val_recall@1"])))


def _beats(a: str, b: Sequence[str] | str, matches: bool = False):
    """A claim "a beats the best of b (chosen on validation)" on test Recall@1."""

    def judge(runs):
        other = _best(runs, [b] if isinstance(b, str) else b)
        ra, rb = _values(runs[a], _recall), _values(runs[other], _recall)
        diff, threshold, outcome = verdict(ra, rb, floor=0.01, matches=matches)
        return (
            f"{a} {_mean_std(ra)} vs {other} {_mean_std(rb)} ({_margin(diff, threshold)})",
            outcome,
        )

    return judge


def _collapse(runs):
    distances = _values(runs["batch_hard"], lambda r: r["metrics"]["mean_test_distance"])
    collapsed = all(d < COLLAPSED for d in distances)
    recall = _values(runs["batch_hard"], _recall)
    text = f"mean test distance {_mean_std(distances)}, Recall@1 {_mean_std(recall)}"
    return text, collapsed


def _claim_collapse(setting_name, runs):
    text, collapsed = _collapse(runs)
    # from scratch the claim is that it collapses; from ImageNet weights that it does not
    expected = setting_name == SCRATCH
    return text, REPRODUCED if collapsed == expected else NOT_REPRODUCED


def _claim_faster(setting_name, runs):
    base = _best(runs, TRIPLETS)
    proxy = _values(runs["proxy_nca"], epochs_to)
    triplet = _values(runs[base], epochs_to)
    # fewer epochs is better: the claim is that -epochs(proxy) beats -epochs(triplet)
    diff, _, outcome = verdict([-e for e in proxy], [-e for e in triplet], floor=1.0)
    text = f"epochs to 90 % of best val: proxy_nca {_mean_std(proxy, 1)} vs {base} {_mean_std(triplet, 1)}"
    return text, outcome


def _gap(runs: Sequence[Mapping]) -> list[float]:
    """Float minus binary Recall@1 of NormSoftmax runs, seed by seed."""
    return [r["metrics"]["recall@1"] - r["binary_metrics"]["recall@1"] for r in runs]


def _claim_binary(setting_name, runs):
    small, large = runs["norm_softmax"], runs["norm_softmax-4x_dims"]
    sizes = [r[0]["bytes_per_image"] // 4 for r in (small, large)]
    if sizes[1] <= sizes[0]:
        raise ValueError(f"the larger code ({sizes[1]}-d) is not larger than {sizes[0]}-d")
    # "approaches float as the size grows": the gap at the larger size is the smaller one
    diff, _, outcome = verdict([-g for g in _gap(large)], [-g for g in _gap(small)], floor=0.01)
    text = (f"float − binary Recall@1: {sizes[0]}-d {_mean_std(_gap(small))}, {sizes[1]}-d "
            f"{_mean_std(_gap(large))}")  # fmt: skip
    return text, outcome


def _combined(outcomes: Sequence[str]) -> str:
    """Several parts: reproduced when every part is, not reproduced when any part is not."""
    if any(o == NOT_REPRODUCED for o in outcomes):
        return NOT_REPRODUCED
    if all(o == REPRODUCED for o in outcomes):
        return REPRODUCED
    return next(o for o in outcomes if o != REPRODUCED)


def _claim_moderate(setting_name, runs):
    """Moderate S (2 or 4 images per class, whichever is better on validation) beats both
    extremes: random batches (S ~ 1) and S = 8, about all of a class's images here (the
    paper's worst, S = 75, filled most of a batch with one class)."""
    moderate = _best(runs, ("norm_softmax-s2", "norm_softmax-s4"))
    parts = [_beats(moderate, extreme)(runs) for extreme in ("norm_softmax", "norm_softmax-s8")]
    text = "; ".join(t for t, _ in parts) + " (S = 8: about all of a class's images)"
    return text, _combined([o for _, o in parts])


def _claim_expansion_ablation(setting_name, runs):
    """The L2 projection matters (EE beats EE without it), and 2 to 8 points work: 2 and 8
    points match each other (neither is behind by the rule's threshold)."""
    names = ("ee", "ee-no_projection", "ee-8_points")
    bases = {r["ee_base"] for name in names for r in runs[name]}
    if len(bases) != 1:  # the parts compare EE runs: on one base, or not at all
        raise ValueError(f"the EE runs are on different bases {sorted(bases)}")
    parts = [_beats("ee", "ee-no_projection")(runs), _beats("ee-8_points", "ee", matches=True)(runs),
             _beats("ee", "ee-8_points", matches=True)(runs)]  # fmt: skip
    return "; ".join(t for t, _ in parts[:2]), _combined([o for _, o in parts])


def _claim_bytes(setting_name, runs):
    ns = runs["norm_softmax"][0]
    ratio = ns["bytes_per_image"] / ns["binary_bytes_per_image"]
    text = (
        f"{ns['bytes_per_image']} → {ns['binary_bytes_per_image']} bytes per image ({ratio:.0f}×)"
    )
    return text, f"size {REPRODUCED if ratio == 32 else NOT_REPRODUCED}; speed: notebook 04"


def _ee_pair(runs):
    base = runs["ee"][0]["ee_base"]
    return base, runs[base], runs["ee"]


def _claim_ee(setting_name, runs):
    base, base_runs, ee_runs = _ee_pair(runs)
    ra, rb = _values(ee_runs, _recall), _values(base_runs, _recall)
    diff, threshold, outcome = verdict(ra, rb, floor=0.01)
    return (
        f"on {base}: {_mean_std(rb)} → {_mean_std(ra)} ({_margin(diff, threshold)}; one base)",
        outcome,
    )


def _claim_selection(setting_name, runs):
    ee_runs = runs["ee"]
    first = _values(ee_runs, lambda r: r["history"][0]["loss_selection_ratio"])
    last = _values(ee_runs, lambda r: r["history"][-1]["loss_selection_ratio"])
    diff, _, outcome = verdict(first, last, floor=0.01)
    return (
        f"synthetic share of hardest negatives: first epoch {_mean_std(first)}, last {_mean_std(last)}",
        outcome,
    )


def _claim_cost(setting_name, runs):
    base, base_runs, ee_runs = _ee_pair(runs)
    ee_s = _values(ee_runs, lambda r: r["seconds_per_epoch"])
    base_s = _values(base_runs, lambda r: r["seconds_per_epoch"])
    # "costs little": EE's time matches its base's, by the rule, with 10 % of it as the floor
    floor = 0.1 * float(np.mean(base_s))
    _, _, outcome = verdict([-s for s in ee_s], [-s for s in base_s], floor, matches=True)
    ratio = np.mean(ee_s) / np.mean(base_s)
    text = (
        f"seconds per epoch {_mean_std(base_s, 1)} → {_mean_std(ee_s, 1)} ({ratio:.2f}×; time only)"
    )
    return text, outcome


def _elsewhere(notebook: str):
    def judge(setting_name, runs):
        return "—", f"{NOT_MEASURED} ({notebook})"

    return judge


def _with_setting(judge):
    def wrapped(setting_name, runs):
        return judge(runs)

    return wrapped


# (claim, the paper's figure, how ours is judged): METHODS.md's seventeen, in its order.
CLAIMS: list[tuple[str, str, Callable]] = [
    ("1. Batch-hard collapses from random initialization; a pretrained backbone prevents it",
     "Hermans et al.: collapse without care", _claim_collapse),
    ("2. Batch-hard beats batch-all and semi-hard", "CUB R@1 48.3 vs 35.9 (EE's table)",
     _with_setting(_beats("batch_hard", ("batch_all", "semi_hard")))),
    ("3. ProxyNCA beats triplets", "CUB R@1 49.2 vs 35.9-48.3",
     _with_setting(_beats("proxy_nca", TRIPLETS))),
    ("4. Proxies converge faster than triplets", "ProxyNCA's figure: epochs to a level",
     _claim_faster),
    ("5. 0.5 proxies per class already beat earlier methods", "ProxyNCA",
     _with_setting(_beats("proxy_nca-half_proxies", TRIPLETS))),
    ("6. Proxies need a much larger learning rate than the backbone", "ProxyNCA++",
     _with_setting(_beats("proxy_nca-proxy_lr_100", "proxy_nca"))),
    ("7. NormSoftmax matches or beats pair- and proxy-based losses", "CUB R@1 61.3 (512-d)",
     _with_setting(_beats("norm_softmax", PAIR_AND_PROXY, matches=True))),
    ("8. LayerNorm without affine after pooling helps", "NormSoftmax's ablation",
     _with_setting(_beats("norm_softmax", "norm_softmax-no_layer_norm"))),
    ("9. Moderate samples per class beat both extremes", "S = 25 best, S = 75 worst",
     _claim_moderate),
    ("10. Temperature 0.05 is much better than 1", "NormSoftmax's temperature table",
     _with_setting(_beats("norm_softmax", "norm_softmax-t1"))),
    ("11. Binary codes approach float as the size grows", "CUB 63.7 vs 65.4 at 2048-d",
     _claim_binary),
    ("12. Hamming search on packed bits is much faster and 32× smaller", "NormSoftmax",
     _claim_bytes),
    ("13. The ranking regularizer adds 1-2 points, more on imbalanced data", "Taha et al.",
     _elsewhere("notebook 05: classification accuracy, balanced and imbalanced")),
    ("14. EE improves every base loss it is added to", "+1.2 to +11.3 on CUB/Cars",
     _claim_ee),
    ("15. EE's synthetic points are chosen as hard negatives less often as training goes on",
     "EE's figure", _claim_selection),
    ("16. The L2 projection of synthetic points matters; 2 to 8 points work", "EE's ablation",
     _claim_expansion_ablation),
    ("17. EE costs little time and memory", "EE", _claim_cost),
]  # fmt: skip


def claims_table(
    records: Iterable[Mapping[str, Any]], settings: Sequence[str] = (SCRATCH, IMAGENET)
) -> pd.DataFrame:
    """One row per claim: the paper's figure, then ours and the verdict in each setting.

    A setting without stored runs, or without a method a claim needs, gives "—" and
    "not measured here".
    """
    records = list(records)
    rows = []
    for claim, paper, judge in CLAIMS:
        row = {"claim": claim, "paper": paper}
        for setting in settings:
            runs = _by_method(records, setting)
            try:
                ours, outcome = judge(setting, runs)
            except (KeyError, IndexError):  # a method it needs was not trained
                ours, outcome = "—", f"{NOT_MEASURED} (runs missing)"
            except ValueError as error:  # runs that cannot answer it (EE on two bases, ...)
                ours, outcome = "—", f"{NOT_MEASURED} ({error})"
            row[f"{setting}: ours"] = ours
            row[f"{setting}: verdict"] = outcome
        rows.append(row)
    return pd.DataFrame(rows).set_index("claim")
