"""The comparison's protocol, its stored records and benchmarks/compare.py, on a tiny folder.

The records must refuse what the notebook must never mix: a number edited by hand, results
made on other data, results made under another protocol.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.image_folders import write_image_folder
from utils_cv.similarity import compare, record_files
from utils_cv.similarity.presets import IMAGENET, SCRATCH, lesson_settings, preset_config

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("compare") / "images", classes=40)


@pytest.fixture(scope="module")
def config():
    return preset_config("smoke", notebook="07_method_comparison", epochs=2, finetune_epochs=2)


@pytest.fixture(scope="module")
def settings(folder, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lesson_settings(config, folder)


@pytest.fixture(scope="module")
def record(settings, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few validation classes, small classes
        return compare.train_method("norm_softmax", settings[SCRATCH], config, seed=0)


@pytest.mark.parametrize("method", [m for m in compare.METHODS if m != "ee"])
@pytest.mark.parametrize("setting", [SCRATCH, IMAGENET])
def test_every_recipe_trains_one_step_under_the_shared_protocol(method, setting, settings, config):
    at = settings[setting]
    recipe = compare.method_recipe(method, at, config)
    model, loss = recipe["model"](), recipe["loss"]()
    images = at.train.images[:16].float() / 255
    labels = at.train.labels[:16]
    if method == "ranking_head":
        value = loss(model.training_outputs(images), labels)
    else:
        value = loss(model(images), labels)
    value.backward()
    assert torch.isfinite(value)
    assert model(images).shape == (16, config["embedding_size"])
    if setting == IMAGENET:  # the pretrained protocol freezes the same stages for every method
        frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)


def test_only_proxies_get_their_own_rate_and_only_norm_softmax_a_warm_up(settings, config):
    at = settings[SCRATCH]
    recipes = {
        m: compare.method_recipe(m, at, config, ee_base="batch_hard") for m in compare.METHODS
    }
    assert recipes["proxy_nca"]["lr"] == at.rate((1.0, config["proxy_lr_multiplier"]))
    assert {m for m, r in recipes.items() if r["lr"] != at.lr} == {"proxy_nca"}
    assert {m for m, r in recipes.items() if r.get("frozen_epochs")} == {"norm_softmax"}
    # positives in every batch for the losses that need them; random batches for classifiers
    assert {m for m in compare.METHODS if "x" not in compare.batches(m, config)} == {
        "softmax", "proxy_nca", "norm_softmax"}  # fmt: skip


def test_ee_wraps_the_named_base_and_refuses_a_base_that_is_not_pair_based(settings, config):
    at = settings[SCRATCH]
    ee = compare.method_recipe("ee", at, config, ee_base="multi_similarity")["loss"]()
    assert type(ee.base_loss).__name__ == "MultiSimilarityLoss"
    assert ee.n_points == config["n_points"]
    with pytest.raises(ValueError, match="EE's base"):
        compare.method_recipe("ee", at, config, ee_base="softmax")
    with pytest.raises(ValueError, match="unknown"):
        compare.method_recipe("arcface", at, config)


def test_each_ablation_changes_one_setting_of_its_method_and_keeps_the_batch_size(settings, config):
    at = settings[SCRATCH]

    def built(name):
        recipe = compare.method_recipe(name, at, config, ee_base="batch_hard")
        return recipe, recipe["model"](), recipe["loss"]()

    C, D = at.train.num_classes, config["embedding_size"]
    assert built("proxy_nca")[2].num_proxies == C
    assert built("proxy_nca-half_proxies")[2].num_proxies == math.ceil(C / 2)
    assert built("proxy_nca-proxy_lr_100")[0]["lr"] == at.rate((1.0, 100.0))
    assert built("norm_softmax")[1].layer_norm is not None
    assert built("norm_softmax-no_layer_norm")[1].layer_norm is None
    assert built("norm_softmax-t1")[2].temperature == 1.0 != config["temperature"]
    recipe, model, loss = built("norm_softmax-4x_dims")
    images = at.train.images[:4].float() / 255
    assert model(images).shape == (4, 4 * D) and loss.embedding_size == 4 * D
    assert built("ee-no_projection")[2].normalize is False and built("ee")[2].normalize
    assert built("ee-8_points")[2].n_points == 8 != config["n_points"]
    batch = config["classes_per_batch"] * config["samples_per_class"]
    assert compare.batches("norm_softmax", config) == f"random {batch}"
    for S in (2, 4, 8):  # the same batch size, in batch // S classes of S images
        assert compare.batches(f"norm_softmax-s{S}", config) == f"{batch // S} classes x {S} images"
    with pytest.raises(ValueError, match="does not divide"):
        compare.batches(
            "norm_softmax-s8", config | {"classes_per_batch": 4, "samples_per_class": 3}
        )
    with pytest.raises(ValueError, match="ablations"):
        compare.family("norm_softmax-s3")
    # everything else of the method stays: its warm-up, its rates, its model's LayerNorm
    for name, (method, change) in compare.ABLATIONS.items():
        recipe, model, _ = built(name)
        base, base_model, _ = built(method)
        assert recipe.get("frozen_epochs") == base.get("frozen_epochs"), name
        assert recipe["lr"] == base["lr"] or "proxy_lr_multiplier" in change, name
        if method == "norm_softmax" and "layer_norm" not in change:
            assert model.layer_norm is not None, name
    assert set(config["ablations"]) < set(compare.ABLATIONS)  # the smoke preset's few


def test_an_ablation_trains_on_its_own_batches_at_the_protocol_s_batch_size(
    settings, config, monkeypatch
):
    seen = {}

    def fake_run(model, loss, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(compare, "train_run", fake_run)
    batch = config["classes_per_batch"] * config["samples_per_class"]
    for name, P, K in (("norm_softmax-s2", batch // 2, 2), ("norm_softmax", None, None)):
        with pytest.raises(RuntimeError, match="stop here"):
            compare.train_method(name, settings[SCRATCH], config, seed=0)
        assert (seen["batch_size"], seen["classes_per_batch"], seen["samples_per_class"]) == (
            batch, P, K)  # fmt: skip


def test_best_base_uses_the_mean_validation_score_of_pair_based_losses_only():
    scores = {"softmax": [0.9, 0.9], "batch_hard": [0.5, 0.3], "multi_similarity": [0.45, 0.45]}
    assert compare.best_base(scores) == "multi_similarity"
    with pytest.raises(ValueError, match="pair-based"):
        compare.best_base({"softmax": [0.9]})


def test_a_record_holds_what_the_notebook_reports(record, settings, config):
    at = settings[SCRATCH]
    assert record["method"] == "norm_softmax" and record["setting"] == SCRATCH
    assert record["protocol"] == compare.protocol(config)
    assert record["batches"] == "random 32"  # the smoke preset's 8 x 4
    assert record["data"]["fingerprint"] == compare.data_fingerprint(at)
    assert {"recall@1", "recall@8", "map@r", "r_precision", "nmi", "f1"} <= set(record["metrics"])
    assert len(record["history"]) == at.epochs
    assert record["bytes_per_image"] == 4 * config["embedding_size"]
    # the binary code of the same embedding: one bit per dimension
    assert record["binary_bytes_per_image"] == config["embedding_size"] // 8
    assert 0 <= record["binary_metrics"]["recall@1"] <= 1
    assert {"torch", "commit", "machine", "device"} <= set(record["environment"])
    assert record["checksum"] == record_files.checksum(record)
    rows = compare.result_rows([record])
    assert [r["method"] for r in rows] == ["norm_softmax", "norm_softmax (binary)"]
    assert rows[1]["bytes/image"] == config["embedding_size"] // 8


def test_provenance_counts_the_records_of_each_machine(record):
    """Seconds per epoch compare only within one machine: the machine names the processor
    and its vector instructions, and the provenance says how many records each made."""
    assert torch.backends.cpu.get_cpu_capability() in record["environment"]["machine"]
    other = {**record, "environment": {**record["environment"], "machine": "another"}}
    made = record_files.provenance([record, record, other])
    assert made["records"] == 3
    here = f"{record['environment']['machine']}, {record['environment']['device']}"
    assert made["machines"] == {here: 2, f"another, {record['environment']['device']}": 1}


def test_the_fingerprint_follows_the_data(settings):
    scratch, imagenet = settings[SCRATCH], settings[IMAGENET]
    assert compare.data_fingerprint(scratch) == compare.data_fingerprint(scratch)
    changed = scratch.test.images.clone()
    changed[0, 0, 0, 0] ^= 1
    other = type(scratch)(**{**scratch.__dict__, "test": type(scratch.test)(
        **{**scratch.test.__dict__, "images": changed})})  # fmt: skip
    assert compare.data_fingerprint(other) != compare.data_fingerprint(scratch)
    assert len(compare.data_fingerprint(imagenet)) == 64


def test_stored_records_round_trip_and_refuse_hand_edits(record, tmp_path, config, settings):
    path = record_files.save_record(tmp_path, record)
    assert path == record_files.result_path(tmp_path, "smoke", SCRATCH, "norm_softmax", 0)
    assert record_files.read_record(path) == record
    assert compare.load_results(tmp_path, "smoke", config=config) == [record]
    fingerprint = record["data"]["fingerprint"]
    at = settings[SCRATCH]
    assert compare.stored_record(tmp_path, config, at, "norm_softmax", 0, fingerprint) == record
    assert compare.stored_record(tmp_path, config, at, "norm_softmax", 0, "0" * 64) is None
    assert (
        compare.stored_record(tmp_path, config | {"lr": 1.0}, at, "norm_softmax", 0, fingerprint)
        is None
    )
    edited = json.loads(path.read_text())
    edited["metrics"]["recall@1"] = round(edited["metrics"]["recall@1"] + 0.1, 5)
    path.write_text(json.dumps(edited))
    with pytest.raises(record_files.StoredResultError, match="edited by hand|changed after"):
        record_files.read_record(path)
    fingerprint = record["data"]["fingerprint"]
    assert (
        compare.stored_record(tmp_path, config, settings[SCRATCH], "norm_softmax", 0, fingerprint)
        is None
    )
    path.write_text("{not json")
    with pytest.raises(record_files.StoredResultError, match="cannot be read"):
        compare.load_results(tmp_path, "smoke")


def test_results_on_other_data_or_another_protocol_are_refused(record, tmp_path, config):
    record_files.save_record(tmp_path, record)
    with pytest.raises(record_files.StoredResultError, match="other data"):
        compare.load_results(tmp_path, "smoke", fingerprints={SCRATCH: "0" * 64})
    with pytest.raises(record_files.StoredResultError, match=r"another protocol.*'margin'"):
        compare.load_results(tmp_path, "smoke", config=config | {"margin": 0.1})
    # a setting the caller did not load is not checked against it
    assert compare.load_results(tmp_path, "smoke", fingerprints={IMAGENET: "0" * 64})


def test_a_record_that_does_not_match_its_checksum_is_not_saved(record, tmp_path):
    with pytest.raises(record_files.StoredResultError, match="checksum"):
        record_files.save_record(tmp_path, record | {"seed": 5})


def test_the_script_trains_what_is_missing_and_nothing_twice(folder, tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compare as script
    finally:
        sys.path.remove(str(BENCHMARKS))
    trained = []
    real = compare.train_method

    def counting(method, setting, config, seed, ee_base=None, fingerprint=None):
        trained.append((setting.name, method, seed, ee_base))
        assert fingerprint == compare.data_fingerprint(setting)  # computed once per setting
        return real(method, setting, config, seed, ee_base, fingerprint)

    monkeypatch.setattr(compare, "train_method", counting)
    monkeypatch.setattr(record_files, "git_commit", lambda: {"commit": "abc", "dirty": False})
    args = ["--preset", "smoke", "--dataset", str(folder), "--results", str(tmp_path),
            "--settings", "scratch", "--methods", "batch_hard", "ee-8_points", "multi_similarity",
            "ee", "norm_softmax-s2", "--seeds", "0"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert script.main(args) == 0
        first = list(trained)
        # EE and its ablations train after every base, on the same chosen base
        assert [t[1] for t in first] == [
            "batch_hard", "multi_similarity", "norm_softmax-s2", "ee-8_points", "ee"]  # fmt: skip
        assert first[3][3] == first[4][3] in ("batch_hard", "multi_similarity")
        stored = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
        assert stored == sorted(f"smoke/from_scratch/{m}/seed0.json" for m in (
            "batch_hard", "ee", "ee-8_points", "multi_similarity", "norm_softmax-s2"))  # fmt: skip
        ablation = record_files.read_record(tmp_path / stored[-1])
        assert ablation["ablation"] == {"samples_per_class": 2}
        assert ablation["batches"].endswith("x 2 images") and "binary_metrics" in ablation
        assert script.main(args) == 0  # resumed: everything is stored
        assert trained == first
        (tmp_path / stored[0]).write_text("{}")  # a broken record is made again
        assert script.main(args) == 0
    assert trained[len(first) :] == [(SCRATCH, "batch_hard", 0, None)]
    # an ablation whose change is not the one stored is refused
    changed = ("norm_softmax", {"samples_per_class": 4})
    monkeypatch.setitem(compare.ABLATIONS, "norm_softmax-s2", changed)
    with pytest.raises(record_files.StoredResultError, match="ablation"):
        compare.load_results(tmp_path, "smoke")


def test_the_script_refuses_a_dirty_checkout(monkeypatch, tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compare as script
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(record_files, "git_commit", lambda: {"commit": "abc", "dirty": True})
    assert script.main(["--results", str(tmp_path)]) == 2
    assert "uncommitted changes" in capsys.readouterr().err
