"""The benchmarks' --quick modes as smoke tests (issue 7): they must keep running end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_filter_quality_quick_runs_every_filter(tmp_path: Path) -> None:
    from filter_quality import run_filter_quality

    result = run_filter_quality(0, quick=True, out_dir=tmp_path)
    assert (tmp_path / "filter_quality.json").is_file()
    assert set(result["filters"]) == {"none", "kcf", "prf_A", "prf_B", "prf_A&B", "oracle"}
    assert result["n_images"] > 0


def test_downstream_seg_quick_trains_and_scores(tmp_path: Path) -> None:
    from downstream_seg import run_downstream_seg

    result = run_downstream_seg([0], quick=True, out_dir=tmp_path)
    assert (tmp_path / "downstream_seg.json").is_file()
    assert "oracle" in str(result)


def test_score_throughput_measures_both_layouts(tmp_path: Path) -> None:
    from test_score import make_env

    env = make_env(tmp_path / "env", n=16)
    out = tmp_path / "throughput.json"
    command = [
        sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "score_throughput.py"),
        str(env.batch), "--models", str(env.a), str(env.b), "--batch-size", "4", "--processes", "2",
        "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    layouts = json.loads(out.read_text())["layouts"]
    assert [layout["processes"] for layout in layouts] == [1, 2]
    for layout in layouts:
        measured = layout["median_ratio_round"]
        assert measured["images"] == 16
        assert measured["end_to_end_images_per_s"] > 0 and measured["raw_forward_images_per_s"] > 0
