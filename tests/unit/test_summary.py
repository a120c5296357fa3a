"""outputs/summary.md: the table `make run` writes from every notebook's metrics.json."""

from __future__ import annotations

import pytest

from utils_cv.common.results import record_metrics
from utils_cv.common.summary import format_seconds, main, write_summary


def test_format_seconds():
    assert format_seconds(9.4) == "9 s"
    assert format_seconds(73) == "1 min 13 s"
    assert format_seconds(600) == "10 min 00 s"


def test_the_table_has_one_row_per_notebook_with_time_and_key_numbers(tmp_path):
    record_metrics(
        tmp_path / "00_quickstart",
        {"preset": "cpu", "seeds": [0], "summary": {"softmax recall@1": 0.2321, "epochs": 40}},
    )
    (tmp_path / "00_quickstart" / "wall_seconds").write_text("183\n")
    record_metrics(tmp_path / "01_triplet_baseline", {"preset": "smoke", "seeds": [0, 1]})
    (tmp_path / "02_proxy_nca").mkdir()  # started, never finished
    (tmp_path / "benchmarks").mkdir()  # not a notebook
    text = write_summary(tmp_path).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert rows == [
        "| 00_quickstart | cpu | 0 | 3 min 03 s | softmax recall@1 0.232; epochs 40 |",
        "| 01_triplet_baseline | smoke | 0, 1 | not measured | (the notebook records no summary) |",
        "| 02_proxy_nca |  |  | not measured | did not finish: no metrics.json |",
    ]
    assert "benchmarks" not in text


def test_missing_outputs_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make run"):
        write_summary(tmp_path / "outputs")


def test_command_line_prints_and_writes(tmp_path, monkeypatch, capsys):
    record_metrics(tmp_path / "00_quickstart", {"preset": "cpu", "summary": {"x": 0.5}})
    monkeypatch.setattr("sys.argv", ["summary", str(tmp_path)])
    main()
    assert "| 00_quickstart | cpu |  | not measured | x 0.500 |" in capsys.readouterr().out
    assert (tmp_path / "summary.md").exists()
