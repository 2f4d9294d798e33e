"""The benchmarks' --quick modes as smoke tests (issue 7): they must keep running end to end."""

from __future__ import annotations

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
