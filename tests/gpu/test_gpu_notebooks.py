"""The notebooks with their GPU presets, asserting what each notebook claims.

Run with `make test-gpu` on a machine with a CUDA GPU; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from tests.notebooks.notebook_runner import assert_every_method, assert_sane, run_notebook
from utils_cv.similarity import compare
from utils_cv.similarity.presets import SCRATCH

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_quickstart_gpu(tmp_path):
    metrics = run_notebook("00_quickstart", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu"
    # The claim of the notebook: training beats both baselines on unseen classes.
    trained = metrics["softmax"]["recall@1"]
    assert trained > metrics["raw_pixels"]["recall@1"] + 0.05
    assert trained > metrics["untrained"]["recall@1"] + 0.05
    # Eight designs, one H200, seed 0 (2026-12-04): softmax 0.583, raw pixels 0.389.
    assert trained >= 0.50


def test_triplet_baseline_gpu(tmp_path):
    metrics = run_notebook("01_triplet_baseline", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # The notebook claims only what every run should show: some mining strategy learns an
    # embedding well above raw pixels (0.389 with the GPU preset in 00_quickstart, eight
    # designs), and the seed spread is reported. Measured so far on an H200 (seed 0):
    # batch-all 0.531, batch-hard 0.392; the notebook has not finished on a GPU yet.
    best = max(metrics["methods"][m]["recall@1"] for m in ("batch_all", "semi_hard", "batch_hard"))
    assert best > 0.44
    assert "recall@1_std" in metrics["methods"]["batch_all"]


def test_proxy_nca_gpu(tmp_path):
    metrics = run_notebook("02_proxy_nca", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # Not yet finished on a GPU: the notebook claims only that ProxyNCA learns an embedding
    # well above raw pixels (0.389 with the GPU preset in 00_quickstart, eight designs) and
    # reports the spread.
    assert metrics["methods"]["proxy_nca"]["recall@1"] > 0.44
    assert "recall@1_std" in metrics["methods"]["proxy_nca"]
    assert set(metrics["sweeps"]) == {
        "scale",
        "proxy_lr_multiplier",
        "include_positive",
        "proxies_per_class",
    }


def test_norm_softmax_gpu(tmp_path):
    metrics = run_notebook("03_norm_softmax", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # Not yet finished on a GPU: the notebook claims only that NormSoftmax learns an
    # embedding well above raw pixels (0.389 with the GPU preset in 00_quickstart, eight
    # designs), reports the spread and runs every sweep of the paper. Notebook 04's
    # NormSoftmax reached 0.60-0.62 on an H200.
    assert metrics["methods"]["norm_softmax"]["recall@1"] > 0.44
    assert "recall@1_std" in metrics["methods"]["norm_softmax"]
    assert set(metrics["sweeps"]) == {
        "temperature",
        "layer_norm",
        "samples_per_class",
        "embedding_size",
        "frozen_epochs",
    }


def test_binarization_gpu(tmp_path):
    metrics = run_notebook("04_binarization", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # Measured on an H200 (2026-12-04, three seeds): float / binary Recall@1 0.603 / 0.497
    # at D = 64, 0.625 / 0.621 at 2048; bits set: pooled 1.0, after LayerNorm 0.43.
    # The notebook's claims: the float embedding learns well above raw pixels
    # (0.389 with the GPU preset in 00_quickstart, eight designs); at the largest size the code keeps
    # most of it (the reference repository loses 0.2 to 1.7 points at 2048 bits); LayerNorm
    # centres the features, while the pooled ReLU features set nearly every bit.
    sizes = metrics["sizes"]
    largest = sizes[max(sizes, key=int)]
    assert largest["recall@1"] > 0.44
    assert largest["binary recall@1"] > largest["recall@1"] - 0.02
    # ... and the code's loss shrinks with the size (10.6 points at 64 bits on the H200).
    smallest = sizes[min(sizes, key=int)]
    gap = {
        name: s["recall@1"] - s["binary recall@1"]
        for name, s in (("small", smallest), ("large", largest))
    }
    assert gap["small"] > gap["large"] + 0.02
    threshold = metrics["threshold"]
    assert threshold["pooled"]["share of bits set"] > 0.8
    assert 0.3 < threshold["after LayerNorm"]["share of bits set"] < 0.7
    assert set(metrics["search"]["hamming_over_float_k10"]) == {"512", "1024", "2048"}


def test_ranking_regularizer_gpu(tmp_path):
    metrics = run_notebook("05_ranking_regularizer", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # Not yet finished on a GPU (balanced softmax: macro 0.867-0.878 on an H200). What the
    # notebook claims whatever the outcome of the comparison:
    # every classifier learns Fashion-MNIST far above chance (0.1), the long tail costs
    # macro accuracy, and retrieval runs for all three embeddings.
    closed = metrics["closed_set"]
    assert all(m["macro_accuracy"] > 0.5 for m in closed["balanced"].values())
    for method in ("softmax_pk", "batch_hard"):
        assert (
            closed["ratio 100"][method]["macro_accuracy"]
            < closed["balanced"][method]["macro_accuracy"]
        )
    assert len(metrics["retrieval"]) == 3
    assert set(metrics["lambda_sweep"]) == {"0", "0.2", "0.5", "1", "2"}


def test_embedding_expansion_gpu(tmp_path):
    metrics = run_notebook("06_embedding_expansion", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # Not yet finished on a GPU (batch-hard 0.392-0.437 on an H200). What the notebook
    # claims whatever the comparison's outcome: every
    # method learns far above chance (1 in about 975 test classes), the ablations ran, the
    # synthetic points are picked as hardest negatives, and the extra memory is the loss's.
    assert all(m["recall@1"] > 0.05 for m in metrics["methods"].values())
    assert set(metrics["ablation"]) == {"n=0", "n=2", "n=4", "n=8", "n=2, no projection"}
    assert all(0 < max(ratios) <= 1 for ratios in metrics["selection_ratio"].values())
    cost = metrics["cost"]
    assert cost["batch_hard+EE"]["loss_saved_kib"] > cost["batch_hard"]["loss_saved_kib"]


def test_method_comparison_gpu(tmp_path):
    metrics = run_notebook("07_method_comparison", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu" and len(metrics["seeds"]) >= 3
    # Never run on a GPU yet. With no stored GPU results it trains the nine methods from
    # scratch on three seeds (the ImageNet setting and the ablations: make compare
    # PRESET=gpu). What it claims whatever the outcome: every method learns far above chance
    # (1 in about 975 test classes), and the classifier as in notebooks 00-03's GPU runs
    # (0.58-0.59 on an H200) well above raw pixels (0.389).
    scratch = metrics["methods"][SCRATCH]
    assert_every_method(scratch)
    assert all(m["recall@1"] > 0.05 and "recall@1_std" in m for m in scratch.values())
    assert scratch["softmax"]["recall@1"] > 0.44
    assert metrics["provenance"]["records"] >= 3 * len(compare.METHODS)


def test_fast_retrieval_gpu(tmp_path):
    metrics = run_notebook("08_fast_retrieval", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu"
    # Not yet run on a GPU. What the notebook claims whatever the model: exact search is the
    # ground truth, HNSW with ef_search 64 finds most of the exact neighbours of the real
    # catalogue, and the speed-recall table covers a million references.
    indexes = metrics["indexes"]
    assert indexes["hnsw (ef_search 64)"]["10-recall@10"] > 0.9
    assert indexes["hnsw (ef_search 64)"]["recall@1"] > indexes["flat"]["recall@1"] - 0.02
    assert metrics["config"]["scale_references"] == 1_000_000
    assert metrics["save_load"]["same_neighbours"] is True


def test_your_own_data_gpu(tmp_path):
    metrics = run_notebook("09_your_own_data", tmp_path, PRESET="gpu")
    assert_sane(metrics)
    assert metrics["preset"] == "gpu"
    # Not yet run on a GPU. What the notebook claims whatever the run: fine-tuning from
    # ImageNet weights beats the ImageNet features on the held-out emoji classes (notebook
    # 00: features 0.26, fine-tuned 0.49 with the CPU preset), and the saved index loads
    # back and answers the same.
    assert metrics["finetuned"]["recall@1"] > metrics["imagenet_features"]["recall@1"] + 0.05
    assert metrics["index"]["same_neighbours"] is True
    assert metrics["benchmarks"]["inshop"]["evaluation"] == "query->gallery"
