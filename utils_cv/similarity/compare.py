"""Every method under one protocol, and its stored results (notebook 07, benchmarks/compare.py).

One protocol for every method: the same backbone, embedding size, image size, augmentation,
epoch budget, learning rate and batch size (notebook 01's budget, ``preset_config(...,
notebook="07_method_comparison")``), the epoch chosen on the validation classes, the test
classes used once at the end. Each method keeps only what defines it: its loss, the
normalization of its embedding, NormSoftmax's LayerNorm and warm-up epoch, ProxyNCA's proxy
rate, the ranking regularizer's second head, and its batches (``BALANCED``): P x K for the
losses that need positives in a batch, random batches for the classifiers, as in their
papers and lessons. Under P x K batches of 16 of the emoji data's 763 training classes the
classifiers fall apart (softmax Recall@1 0.09 on three seeds, below raw pixels; NormSoftmax
with S = 4 0.325 against 0.431 with random batches, notebook 03), which would compare the
sampler, not the losses.

A training leaves one small JSON record (``make_record``; its file format, checksum and
provenance are ``record_files``): the protocol, the versions, the git commit, the machine,
the data's fingerprint, the test metrics, the per-epoch history and a checksum of all that.
``load_results`` refuses a record whose checksum, data or protocol does not match, so
results made on other data, under another protocol or edited by hand never mix with the
others.

>>> config = preset_config("cpu", notebook="07_method_comparison")  # doctest: +SKIP
>>> settings = lesson_settings(config, "emoji")  # doctest: +SKIP
>>> record = train_method("batch_hard", settings[SCRATCH], config, seed=0)  # doctest: +SKIP
>>> record["metrics"]["recall@1"]  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from utils_cv.common.results import rounded
from utils_cv.similarity.binary import binarize
from utils_cv.similarity.losses import (
    EmbeddingExpansion,
    MultiSimilarityLoss,
    NormSoftmaxLoss,
    ProxyNCALoss,
    RankingRegularizedLoss,
    SoftmaxLoss,
    TripletLoss,
)
from utils_cv.similarity.metrics import mean_distance, retrieval_metrics
from utils_cv.similarity.models import TwoHeadNet
from utils_cv.similarity.presets import IMAGENET, Setting
from utils_cv.similarity.record_files import (
    RESULTS_DIR,
    SCHEMA,
    StoredResultError,
    checksum,
    environment,
    read_record,
    result_path,
    save_record,
)
from utils_cv.similarity.runner import Run, train_run

# What each method is, in the order the table shows them.
METHODS: dict[str, str] = {
    "softmax": "softmax classifier: cross-entropy with a bias, embedding not normalized",
    "batch_all": "triplet loss, every active triplet of the batch (batch-all)",
    "semi_hard": "triplet loss, one semi-hard negative per positive pair",
    "batch_hard": "triplet loss, the hardest positive and negative of each anchor",
    "proxy_nca": "ProxyNCA, softmax form, one proxy per class",
    "norm_softmax": "NormSoftmax: cosine classifier, LayerNorm, one warm-up epoch",
    "ranking_head": "softmax + batch-hard on a second head (ranking regularizer): that head",
    "multi_similarity": "multi-similarity loss with its pair mining",
    "ee": "Embedding Expansion on the pair-based loss best on the validation classes",
}
# One method with one of its settings changed, for the claims about that setting (METHODS.md's
# claims 5, 6, 8-11 and 16): name -> (the method, what changes). An ablation trains under the
# same protocol as the methods and is stored beside them (its name is its folder).
# samples_per_class S puts a classifier on P x K batches of batch // S classes (random
# batches of 64 from 763 classes hold about one image per class: S ~ 1; S = 8 is about all
# of a class's images here); embedding_factor multiplies the protocol's embedding size
# (128 -> 512 on the CPU preset, 512 -> 2048, the paper's largest, on the GPU preset).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "proxy_nca-half_proxies": ("proxy_nca", {"proxies_per_class": 0.5}),
    "proxy_nca-proxy_lr_100": ("proxy_nca", {"proxy_lr_multiplier": 100.0}),
    "norm_softmax-no_layer_norm": ("norm_softmax", {"layer_norm": False}),
    "norm_softmax-s2": ("norm_softmax", {"samples_per_class": 2}),
    "norm_softmax-s4": ("norm_softmax", {"samples_per_class": 4}),
    "norm_softmax-s8": ("norm_softmax", {"samples_per_class": 8}),
    "norm_softmax-t1": ("norm_softmax", {"temperature": 1.0}),
    "norm_softmax-4x_dims": ("norm_softmax", {"embedding_factor": 4}),
    "ee-no_projection": ("ee", {"project_synthetic": False}),
    "ee-8_points": ("ee", {"n_points": 8}),
}
# The bases EE may be put on (pair-based losses); ``best_base`` picks one per setting.
PAIR_BASED = ("batch_all", "semi_hard", "batch_hard", "multi_similarity")
# The methods trained on P x K batches (they need positives in every batch); the others
# (softmax, proxy_nca, norm_softmax) on random batches of the same size.
BALANCED = (*PAIR_BASED, "ranking_head", "ee")
# The protocol's settings; a record made under other values is not mixed with the others.
PROTOCOL_KEYS = (
    "backbone", "weights", "image_size", "epochs", "lr", "embedding_size", "classes_per_batch",
    "samples_per_class", "margin", "scale", "proxy_lr_multiplier", "temperature", "n_points",
    "finetune_backbone", "finetune_image_size", "finetune_epochs", "finetune_lr", "frozen_stages",
    "max_classes", "max_per_class",
)  # fmt: skip
KS = (1, 2, 4, 8)
# Below this mean test distance an embedding has collapsed (random unit vectors: about 1.41).
COLLAPSED = 0.05


def family(method: str) -> str:
    """The method an ablation changes (``ABLATIONS``), or ``method`` itself."""
    if method in METHODS:
        return method
    if method in ABLATIONS:
        return ABLATIONS[method][0]
    raise ValueError(
        f"method {method!r} is unknown; choose from {list(METHODS)} or the ablations "
        f"{list(ABLATIONS)}"
    )


def ablation(method: str) -> dict[str, Any] | None:
    """What an ablation changes (None for a method), as its records store it."""
    family(method)  # an unknown name raises
    return ABLATIONS[method][1] if method in ABLATIONS else None


def resolve(method: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(the method, the config it trains with, whether on P x K batches) for a method or an
    ablation: the ablation's changes applied to the protocol's config, the batch size kept."""
    base, changes = family(method), ablation(method) or {}
    effective = dict(config) | changes
    balanced = base in BALANCED
    if "samples_per_class" in changes:  # the same batch size, in batch // S classes
        S = changes["samples_per_class"]
        batch = config["classes_per_batch"] * config["samples_per_class"]
        if batch % S:
            raise ValueError(f"{method}: S = {S} images per class does not divide the batch "
                             f"of {batch}; the ablation must keep the batch size")  # fmt: skip
        effective["classes_per_batch"] = batch // S
        balanced = True
    if "embedding_factor" in changes:
        effective["embedding_size"] = config["embedding_size"] * changes["embedding_factor"]
    return base, effective, balanced


def compared(config: Mapping[str, Any]) -> list[str]:
    """Every method, then the ablations of ``config["ablations"]`` ("all": every one)."""
    ablations = config.get("ablations", ())
    return [*METHODS, *(ABLATIONS if ablations == "all" else ablations)]


def to_train(config: Mapping[str, Any]) -> list[str]:
    """What notebook 07 trains when results are missing: ``compared`` with
    ``config["train_ablations"]``, the methods alone without."""
    return compared(config) if config["train_ablations"] else list(METHODS)


def protocol(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every method shares, as recorded with each result."""
    missing = [key for key in PROTOCOL_KEYS if key not in config]
    if missing:
        raise KeyError(f"the config lacks the protocol's settings {missing}")
    return {key: config[key] for key in PROTOCOL_KEYS}


def data_fingerprint(setting: Setting) -> str:
    """sha256 of a setting's three splits as trained on: images (at the setting's size),
    labels, class names. Two loads of the same data at the same size give the same value."""
    digest = hashlib.sha256()
    for split in (setting.train, setting.val, setting.test):
        digest.update(split.images.cpu().contiguous().numpy().tobytes())
        digest.update(split.labels.cpu().numpy().tobytes())
        digest.update("\n".join(split.class_names).encode())
    return digest.hexdigest()


def best_base(val_scores: Mapping[str, Sequence[float]]) -> str:
    """The pair-based loss with the best mean validation Recall@1 (test classes unused).

    val_scores: method -> the best validation Recall@1 of each of its seeds.
    """
    scored = {m: sum(v) / len(v) for m, v in val_scores.items() if m in PAIR_BASED and v}
    if not scored:
        raise ValueError(f"EE needs a trained pair-based base first, one of {PAIR_BASED}")
    return max(scored, key=scored.get)


def _net(setting: Setting, normalize: bool = True, **kwargs) -> torch.nn.Module:
    return setting.net(normalize=normalize, **kwargs)


def _two_head(setting: Setting, config: Mapping[str, Any]) -> torch.nn.Module:
    imagenet = setting.name == IMAGENET
    backbone = config["finetune_backbone" if imagenet else "backbone"]
    # A FileList holds no pixels: it is decoded at the config's image size (paper.py).
    pixels = getattr(setting.train, "images", None)
    model = TwoHeadNet(
        backbone,
        num_classes=setting.train.num_classes,
        image_size=config["image_size"] if pixels is None else tuple(pixels.shape[2:]),
        embedding_size=config["embedding_size"],
        weights="imagenet" if imagenet else config["weights"],
        frozen_stages=config["frozen_stages"] if imagenet else 0,
    )
    return model.to(memory_format=torch.channels_last) if imagenet else model


def method_recipe(
    method: str, setting: Setting, config: Mapping[str, Any], ee_base: str | None = None
) -> dict[str, Any]:
    """``train_run``'s model, loss, learning rate and phases for ``method`` in ``setting``.

    Every method gets the same budget, rate and batch size (``classes_per_batch`` x
    ``samples_per_class``), in P x K batches for the methods in ``BALANCED`` and random
    batches for the others; ProxyNCA's proxies train at ``proxy_lr_multiplier`` times the
    rate, and NormSoftmax trains only its class weights in a first, frozen epoch (its
    paper's warm-up).
    """
    method, config, _ = resolve(method, config)  # an ablation: its method, changed
    D, C, margin = config["embedding_size"], setting.train.num_classes, config["margin"]
    net = partial(_net, setting, embedding_size=D)
    recipe: dict[str, Any] = {"model": net, "lr": setting.rate()}
    if method == "softmax":
        recipe |= {"model": partial(net, normalize=False),
                   "loss": partial(SoftmaxLoss, D, C)}  # fmt: skip
    elif method in ("batch_all", "semi_hard", "batch_hard"):
        recipe["loss"] = partial(TripletLoss, margin, mining=method)
    elif method == "proxy_nca":
        recipe["loss"] = partial(ProxyNCALoss, C, D, scale=config["scale"],
                                 proxies_per_class=config.get("proxies_per_class", 1),
                                 label_smoothing=config.get("label_smoothing", 0.0))  # fmt: skip
        recipe["lr"] = setting.rate((1.0, config["proxy_lr_multiplier"]))
    elif method == "norm_softmax":
        layer_norm = config.get("layer_norm", True)
        recipe |= {"model": partial(net, layer_norm=layer_norm),
                   "frozen_epochs": 1,
                   "loss": partial(NormSoftmaxLoss, C, D, config["temperature"])}  # fmt: skip
    elif method == "ranking_head":
        triplet = partial(TripletLoss, margin, "batch_hard", squared=True)
        recipe |= {"model": partial(_two_head, setting, config),
                   "loss": lambda: RankingRegularizedLoss(C, triplet())}  # fmt: skip
    elif method == "multi_similarity":
        recipe["loss"] = MultiSimilarityLoss
    else:  # ee
        if ee_base not in PAIR_BASED:
            raise ValueError(f"EE's base must be one of {PAIR_BASED}, got {ee_base!r}")
        base = method_recipe(ee_base, setting, config)["loss"]
        n, project = config["n_points"], config.get("project_synthetic", True)
        recipe["loss"] = lambda: EmbeddingExpansion(base(), n, normalize=project)
    return recipe


def batches(method: str, config: Mapping[str, Any]) -> str:
    """How ``method``'s batches are made, in words: "16 classes x 4 images" or "random 64"."""
    _, config, balanced = resolve(method, config)
    P, K = config["classes_per_batch"], config["samples_per_class"]
    return f"{P} classes x {K} images" if balanced else f"random {P * K}"


def train_method(
    method: str,
    setting: Setting,
    config: Mapping[str, Any],
    seed: int,
    ee_base: str | None = None,
    fingerprint: str | None = None,
    **learner_kwargs,
) -> dict[str, Any]:
    """Train ``method`` in ``setting`` on one seed and return its record (``make_record``;
    ``fingerprint``: the setting's ``data_fingerprint`` when the caller has it already)."""
    run = run_method(method, setting, config, seed, ee_base, **learner_kwargs)
    return make_record(method, setting, config, seed, run, ee_base, fingerprint)


def run_method(
    method: str,
    setting: Setting,
    config: Mapping[str, Any],
    seed: int,
    ee_base: str | None = None,
    **learner_kwargs,
) -> Run:
    """``train_run`` of ``method``'s recipe in ``setting`` on one seed (on every process of a
    launch: utils_cv.similarity.launch)."""
    recipe = method_recipe(method, setting, config, ee_base)
    _, trained_with, balanced = resolve(method, config)
    P, K = trained_with["classes_per_batch"], trained_with["samples_per_class"]
    return train_run(
        recipe["model"],
        recipe["loss"],
        **setting.budget,
        lr=recipe["lr"],
        seed=seed,
        batch_size=P * K,
        classes_per_batch=P if balanced else None,
        samples_per_class=K if balanced else None,
        frozen_epochs=recipe.get("frozen_epochs", 0),
        ks=KS,
        nmi=True,
        **learner_kwargs,
    )


def make_record(
    method: str,
    setting: Setting,
    config: Mapping[str, Any],
    seed: int,
    run: Run,
    ee_base: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """One training's stored result, with its checksum (``checksum``).

    metrics: the test metrics (Recall@1/2/4/8, MAP@R, R-Precision, NMI, F1) and the mean
    test distance. NormSoftmax also gets ``binary_metrics``: the same metrics of the sign
    of its embedding, searched by Hamming distance (notebook 04's codes).
    """
    embeddings = run.embeddings
    metrics = dict(run.metrics) | {"mean_test_distance": mean_distance(embeddings)}
    dim = embeddings.shape[1]
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "method": method,
        "ablation": ablation(method),
        "ee_base": ee_base,
        "setting": setting.name,
        "seed": seed,
        "preset": config.get("preset"),
        "protocol": protocol(config),
        "batches": batches(method, config),
        "data": {
            "images": len(setting.data),
            "fingerprint": fingerprint or data_fingerprint(setting),
        },
        "metrics": rounded(metrics, 5),
        "bytes_per_image": 4 * dim,
        "best_epoch": run.best_epoch,
        "best_val_recall@1": run.best_score,
        "seconds": round(run.seconds, 2),
        "seconds_per_epoch": round(run.seconds / setting.epochs, 2),
        "history": rounded(run.history, 5),
        "environment": environment(),
        "made": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if family(method) == "norm_softmax":
        codes = binarize(embeddings)
        labels = setting.test.labels
        binary = retrieval_metrics(codes, labels, ks=KS, metric="hamming", nmi=True)
        record["binary_metrics"] = rounded(binary, 5)
        record["binary_bytes_per_image"] = codes.shape[1]
    record["checksum"] = checksum(record)
    return record


def load_results(
    root: str | os.PathLike,
    preset: str,
    fingerprints: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every stored record of ``preset`` under ``root``, each verified.

    Args:
        root, preset: where the records are, and of which preset.
        fingerprints: setting name -> ``data_fingerprint`` of the data loaded now; a record
            of that setting made on other data is refused (StoredResultError).
        config: the protocol now; a record made under another one is refused.
    """
    records = []
    for path in sorted((Path(root) / preset).glob("*/*/seed*.json")):
        record = read_record(path)
        setting = record["setting"]
        if fingerprints is not None and setting in fingerprints:
            if record["data"]["fingerprint"] != fingerprints[setting]:
                raise StoredResultError(
                    f"{path} was made on other data than the data loaded now ({setting}): "
                    "results on different data do not mix. Re-make them on this data with "
                    "`python benchmarks/compare.py --results <a new folder>`, or load the "
                    "data they were made on"
                )
        try:
            changed = ablation(record["method"])
        except ValueError as error:  # a folder of a method or ablation this code lacks
            raise StoredResultError(f"{path}: {error}; move the folder away") from error
        if record.get("ablation") != changed:
            raise StoredResultError(
                f"{path} was made with the ablation {record.get('ablation')}, but "
                f"{record['method']} now changes {changed}; re-make it with "
                "`python benchmarks/compare.py`"
            )
        if config is not None and record.get("batches") != batches(record["method"], config):
            raise StoredResultError(
                f"{path} was trained on other batches ({record.get('batches')}) than this "
                f"protocol gives {record['method']} ({batches(record['method'], config)}); "
                "re-make it with `python benchmarks/compare.py`"
            )
        if config is not None and record["protocol"] != protocol(config):
            changed = sorted(
                k for k, v in protocol(config).items() if record["protocol"].get(k) != v
            )
            raise StoredResultError(
                f"{path} was made under another protocol (it differs in {changed}); re-make "
                "the stored results with `python benchmarks/compare.py` under this one"
            )
        records.append(record)
    return records


def result_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per record for ``seed_summary``/``seed_table`` (``by="method"``), in the order
    of ``METHODS`` then ``ABLATIONS``, and one more per NormSoftmax record for its binary code
    ("norm_softmax (binary)"); EE is named by its base ("multi_similarity + EE")."""
    rows = []
    order = [*METHODS, *ABLATIONS]
    for r in sorted(records, key=lambda r: (order.index(r["method"]), r["seed"])):
        method = r["method"]  # EE by its base: "multi_similarity + EE", "... + EE-8_points"
        name = method if family(method) != "ee" else f"{r['ee_base']} + EE{method[2:]}"
        common = {"setting": r["setting"], "seed": r["seed"], "seconds/epoch": r["seconds_per_epoch"],
                  "best epoch": r["best_epoch"], "best val recall@1": r["best_val_recall@1"]}  # fmt: skip
        rows.append({"method": name, **common, **r["metrics"], "bytes/image": r["bytes_per_image"]})
        if "binary_metrics" in r:
            rows.append({"method": f"{name} (binary)", **common, **r["binary_metrics"],
                         "mean_test_distance": None,
                         "bytes/image": r["binary_bytes_per_image"]})  # fmt: skip
    return rows


def default_results_dir(
    preset: str, dataset: str | os.PathLike, output_dir: str | os.PathLike
) -> Path:
    """Where notebook 07 reads (and, when it trains, writes) results: the repository's stored
    ones for the built-in emoji data when they exist for ``preset``, else a folder of the
    notebook's own outputs (never the repository, never the user's data)."""
    if str(dataset) == "emoji" and (RESULTS_DIR / preset).is_dir():
        return RESULTS_DIR
    return Path(output_dir) / "results"


def stored_record(
    root: str | os.PathLike,
    config: Mapping[str, Any],
    setting: Setting,
    method: str,
    seed: int,
    fingerprint: str,
    ee_base: str | None = None,
) -> dict[str, Any] | None:
    """The stored record of one training if it is intact and was made on this data, under
    this protocol, on this method's batches (and, for EE, on ``ee_base``); else None."""
    path = result_path(root, config["preset"], setting.name, method, seed)
    try:
        record = read_record(path)
    except StoredResultError:
        return None
    valid = (
        record["data"]["fingerprint"] == fingerprint
        and record["protocol"] == protocol(config)
        and record.get("ablation") == ablation(method)
        and record.get("batches") == batches(method, config)
        and (family(method) != "ee" or ee_base is None or record["ee_base"] == ee_base)
    )
    return record if valid else None


def train_missing(
    root: str | os.PathLike,
    settings: Mapping[str, Setting],
    config: Mapping[str, Any],
    methods: Sequence[str] | None = None,
    log=print,
) -> int:
    """Train and store every (setting, method, seed in ``config["seeds"]``) without a valid
    stored record; returns how many trained.

    methods: names of ``METHODS`` and ``ABLATIONS``; None: every method and the preset's
    ``config["ablations"]``.

    Each training is stored as soon as it ends (in the worker that trained it, with
    ``config["workers"]`` > 1), so an interruption loses only the trainings under way. EE
    trains last in each setting, on the pair-based base with the best mean validation
    Recall@1 there (``best_base``); an EE record made on another base is made again.
    """
    from utils_cv.similarity.runner import train_runs  # the runner imports fastai: only here

    methods = compared(config) if methods is None else methods
    trained = 0
    expanded = [m for m in methods if family(m) == "ee"]
    bases = [m for m in methods if family(m) != "ee"]
    for setting in settings.values():
        fingerprint = data_fingerprint(setting)
        phases = [(bases, None)] + ([(expanded, "best")] if expanded else [])
        for names, ee_base in phases:
            if ee_base == "best":  # EE's base: chosen on the stored bases' validation scores
                scores = {}
                for m in PAIR_BASED:
                    found = [stored_record(root, config, setting, m, s, fingerprint)
                             for s in config["seeds"]]  # fmt: skip
                    scores[m] = [r["best_val_recall@1"] for r in found if r is not None]
                ee_base = best_base(scores)
                log(f"{setting.name}: EE goes on {ee_base} (best mean validation Recall@1)")
            jobs = [(m, s) for m in names for s in config["seeds"]
                    if stored_record(root, config, setting, m, s, fingerprint, ee_base) is None]  # fmt: skip
            log(f"{setting.name}: {len(names) * len(config['seeds']) - len(jobs)} of "
                f"{len(names) * len(config['seeds'])} stored, {len(jobs)} to train")  # fmt: skip

            def train_one(method, seed, setting=setting, ee_base=ee_base, fingerprint=fingerprint):
                record = train_method(method, setting, config, seed, ee_base, fingerprint)
                save_record(root, record)
                log(f"  {setting.name}, {method}, seed {seed}: Recall@1 "
                    f"{record['metrics']['recall@1']:.3f}, {record['seconds']:.0f} s")  # fmt: skip

            train_runs(train_one, jobs, config["workers"])
            trained += len(jobs)
    return trained
