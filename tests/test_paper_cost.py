"""benchmarks/paper_cost.py: KCF's paper-protocol cost per image from two short runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.paper_cost import kcf_cost_per_image, main  # noqa: E402


def _kcf_cost(train_seconds: float, score_seconds: float) -> dict:
    folds = [{"fold": k, "train_images": 100, "held_out": 100} for k in range(2)]
    return {"train_seconds": train_seconds, "score_seconds": score_seconds, "per_fold": folds}


def _paper_cost(tmp_path: Path, kcf_1: Path, kcf_3: Path, **prf_run: object) -> dict:
    """paper_cost.py's result for two KCF runs (of 1 and 3 epochs) and a PRF throughput run of 1000 images
    at 100 images/s end to end and 200 marginally (``prf_run``: more keys of its JSON); it is kept at
    ``tmp_path / "prf.json"``."""
    round_ = {"images": 1000, "end_to_end_images_per_s": 100.0, "marginal_images_per_s": 200.0}
    prf = {**prf_run, "layouts": [{"median_ratio_round": round_}]}
    (tmp_path / "prf.json").write_text(json.dumps(prf))
    out = tmp_path / "cost.json"
    main([
        "--kcf", f"{kcf_1}:1", "--kcf", f"{kcf_3}:3", "--prf", str(tmp_path / "prf.json"), "--out", str(out),
    ])  # fmt: skip
    return json.loads(out.read_text())


def test_the_marginal_epoch_cost_cancels_start_up_and_extends_to_the_protocol() -> None:
    # 10 s of start-up in both runs; each image-epoch costs 0.01 s: 1 epoch = 10 + 2 s, 3 epochs = 10 + 6 s
    runs = [(_kcf_cost(16.0, 3.0), 3), (_kcf_cost(12.0, 2.0), 1)]
    cost = kcf_cost_per_image(runs, folds=5, epochs=150)
    assert cost["train_seconds_per_image_epoch"] == pytest.approx(0.01)
    assert cost["score_seconds_per_image"] == pytest.approx(2.0 / 200)
    assert cost["seconds_per_batch_image"] == pytest.approx(4 * 150 * 0.01 + 0.01)
    with pytest.raises(SystemExit, match="differ in epochs"):
        kcf_cost_per_image([runs[0], runs[0]], folds=5, epochs=150)


def test_main_divides_by_prf_seconds_per_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "k1.json").write_text(json.dumps(_kcf_cost(12.0, 2.0)))
    (tmp_path / "k3.json").write_text(json.dumps(_kcf_cost(16.0, 2.0)))
    result = _paper_cost(tmp_path, tmp_path / "k1.json", tmp_path / "k3.json", machine={"gpu": "test"})
    kcf_seconds = 4 * 150 * 0.01 + 0.01
    assert result["ratio_whole_call"] == pytest.approx(kcf_seconds / 0.01)
    assert result["ratio_marginal"] == pytest.approx(kcf_seconds / 0.005)
    with pytest.raises(SystemExit):
        main(["--kcf", "no-epochs.json", "--kcf", "x.json:1", "--prf", str(tmp_path / "prf.json")])


def test_a_kcf_run_is_read_from_its_scores_file(tmp_path: Path) -> None:
    """``prf kcf`` keeps the run's cost in the SCORES metadata: paper_cost reads it there, and its result
    keeps both runs' measurements."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prf.score_io import METADATA_KEY

    for epochs, train in ((1, 12.0), (3, 16.0)):
        metadata = {METADATA_KEY: json.dumps({"cost": _kcf_cost(train, 2.0)}).encode()}
        table = pa.table({"image_id": ["0"]}).replace_schema_metadata(metadata)
        pq.write_table(table, tmp_path / f"kcf_{epochs}.parquet")
    result = _paper_cost(tmp_path, tmp_path / "kcf_1.parquet", tmp_path / "kcf_3.parquet")
    assert result["kcf"]["train_seconds_per_image_epoch"] == pytest.approx(0.01)
    assert [(r["epochs"], r["train_seconds"]) for r in result["kcf_runs"]] == [(1, 12.0), (3, 16.0)]
