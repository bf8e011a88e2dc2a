"""An annotator outage is visible where a user looks: the progress line and ``curves.png``."""

from __future__ import annotations

import json

import pytest

from oni_sys.cli import ProgressBar
from oni_sys.runtime.plots import outage_intervals, write_curves

ROWS = [
    {"env_steps": 1000, "annotator_up": 1, "labels_total": 3, "episode_return_mean": 0.1},
    {"env_steps": 2000, "annotator_up": 0, "annotator_outage_s": 12.0, "labels_total": 3},
    {"env_steps": 3000, "annotator_up": 0, "annotator_outage_s": 45.0, "labels_total": 3},
    {"env_steps": 4000, "annotator_up": 1, "labels_total": 9, "episode_return_mean": 0.3},
    {"env_steps": 5000, "annotator_up": 0, "annotator_outage_s": 5.0, "labels_total": 9},
]


def test_outage_intervals_span_the_down_rows_from_the_last_up_step():
    assert outage_intervals(ROWS) == [(1000, 3000), (4000, 5000)]
    assert outage_intervals([{"env_steps": 5, "annotator_up": 1}]) == []
    assert outage_intervals([{"env_steps": 5}]) == []  # a run without an annotator


def test_curves_png_marks_the_outages(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    target = write_curves(tmp_path)
    assert target is not None and target.stat().st_size > 1000


def test_progress_line_says_the_annotator_is_down(capsys):
    bar = ProgressBar(10_000, enabled=True)
    bar.start(0)
    row = {
        "env_steps": 3000,
        "sps": 900.0,
        "episodes": 4,
        "episode_return_mean": 0.5,
        "labels_total": 3,
        "annotator_queue": 7,
        "annotator_up": 0.0,
        "annotator_outage_s": 45.2,
    }
    bar(row)
    assert "annotator down 45 s" in bar.bar.postfix
    bar({**row, "annotator_up": 1.0, "annotator_outage_s": 0.0})
    assert "annotator down" not in bar.bar.postfix
    bar.close()
