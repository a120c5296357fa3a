"""Each notebook, executed headless by papermill with the smoke preset.

The smoke preset only proves that a notebook runs top to bottom and records sane numbers;
what a notebook claims about accuracy is checked by tests/gpu with the full presets.
"""

from __future__ import annotations

import pytest

from .notebook_runner import NOTEBOOK_DIR, assert_sane, flatten, run_notebook

# Keys each notebook must record in metrics.json (flattened with "/").
EXPECTED_KEYS = {
    "00_quickstart": [
        "preset",
        "raw_pixels/recall@1",
        "untrained/recall@1",
        "softmax/recall@1",
        "softmax/map@r",
        "softmax/r_precision",
        "softmax_openmoji_to_noto/recall@1",
        "training/final_train_loss",
        "training/best_val_recall@1",
    ],
}


def test_every_notebook_has_a_smoke_test():
    names = {p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")}
    assert names == set(EXPECTED_KEYS), f"untested: {names - set(EXPECTED_KEYS)}"


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_notebook_smoke(name, tmp_path):
    metrics = run_notebook(name, tmp_path, PRESET="smoke")
    flat = flatten(metrics)
    missing = [key for key in EXPECTED_KEYS[name] if key not in flat]
    assert not missing, f"{name} did not record {missing}; it recorded {sorted(flat)}"
    assert flat["preset"] == "smoke"
    assert_sane(metrics)
