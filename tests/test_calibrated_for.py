"""Thresholds name the checkpoints they were calibrated for (``calibrated_for_sha256``): calibrate writes
it, ``prf score`` warns when another checkpoint scores that model, the check set must match it, and the
shipped thresholds.yaml names the shipped checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from test_calibrate_report import labels_csv, make_app, synthetic_scores
from test_score import Env, make_env, save_tiny_checkpoint
from typer.testing import CliRunner

from prf.calibrate import calibrate, evaluate_thresholds
from prf.checkpoint import sha256_file
from prf.score import score
from prf.thresholds import (
    CalibrationMismatchWarning,
    ThresholdsError,
    calibration_mismatches,
    dump_thresholds,
    load_thresholds,
    parse_thresholds,
)

REPO = Path(__file__).resolve().parent.parent
SHA_A, SHA_B = "a" * 64, "b" * 64
TWO_MODELS = f"""
models:
  A: {{calibrated_for_sha256: {SHA_A}, pa_mpjpe_max: 100, s_mpjpe_max: null, pck: null}}
  B: {{pa_mpjpe_max: 100, s_mpjpe_max: null, pck: null}}
"""


def test_the_key_is_validated_and_written_back(tmp_path: Path) -> None:
    parsed = parse_thresholds(TWO_MODELS)
    assert parsed.config.models["A"].calibrated_for_sha256 == SHA_A
    assert parsed.config.models["B"].calibrated_for_sha256 is None
    assert parse_thresholds(dump_thresholds(parsed.config)).config == parsed.config
    bad = tmp_path / "bad.yaml"
    bad.write_text(TWO_MODELS.replace(SHA_A, "3b885813"))
    with pytest.raises(ThresholdsError, match=r"models\.A\.calibrated_for_sha256: .*64 lowercase hex"):
        load_thresholds(bad)


def test_mismatches_name_only_the_models_that_differ() -> None:
    thresholds = parse_thresholds(TWO_MODELS, source="th.yaml")
    assert calibration_mismatches(thresholds, {"A": SHA_A, "B": "c" * 64}) == []  # B names none
    (message,) = calibration_mismatches(thresholds, {"A": "c" * 64, "B": SHA_B})
    assert "model A" in message and "aaaaaaaaaaaa" in message and "cccccccccccc" in message
    assert "models.A.calibrated_for_sha256" in message and "prf calibrate" in message


def test_calibrate_writes_the_sha256_of_the_scored_checkpoints(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    labels = labels_csv(tmp_path / "labels.csv", synthetic_scores(scores))  # provenance: A "a"*64, B "b"*64
    result = calibrate(scores, labels, out=tmp_path / "th.yaml")
    written = load_thresholds(tmp_path / "th.yaml").config
    for config in (result.config, written):
        assert config.models["A"].calibrated_for_sha256 == SHA_A
        assert config.models["B"].calibrated_for_sha256 == SHA_B


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Env, Path, Path, Path]:
    """A tiny batch scored by two untrained checkpoints, thresholds calibrated on it, and a third
    checkpoint (same size as A's) that the thresholds were not calibrated for."""
    env = make_env(tmp_path_factory.mktemp("calibrated_for"), n=6)
    scores = env.root / "scores.parquet"
    score(env.batch, env.loose, [env.a, env.b], scores, batch_size=4, workers=0, device="cpu", quiet=True)
    thresholds = env.root / "th.yaml"
    calibrate(scores, env.batch, out=thresholds)
    other = save_tiny_checkpoint(env.root / "other.pt", 64, seed=2)
    return env, scores, thresholds, other


def test_score_warns_for_another_checkpoint_and_not_for_the_same(
    calibrated: tuple[Env, Path, Path, Path],
) -> None:
    env, _, thresholds, other = calibrated
    config = load_thresholds(thresholds).config
    assert config.models["A"].calibrated_for_sha256 == sha256_file(env.a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationMismatchWarning)  # the same checkpoints: no warning
        score(env.batch, thresholds, [env.a, env.b], env.root / "same.parquet", workers=0, device="cpu",
              quiet=True)  # fmt: skip
    with pytest.warns(CalibrationMismatchWarning, match=r"model A: .*calibrated for checkpoint") as shown:
        summary = score(env.batch, thresholds, [other, env.b], env.root / "other.parquet", workers=0,
                        device="cpu", quiet=True)  # fmt: skip
    assert len(shown) == 1 and summary.total == 6  # a warning, not a refusal: every image scored


def test_cli_prints_the_warning_as_one_line(calibrated: tuple[Env, Path, Path, Path]) -> None:
    env, _, thresholds, other = calibrated
    out = env.root / "cli.parquet"
    args = ["score", str(env.batch), "--thresholds", str(thresholds), "--models", f"{other},{env.b}"]
    result = CliRunner().invoke(make_app(), [*args, "--out", str(out), "--workers", "0", "--quiet"])
    text = " ".join(result.output.split())  # rich wraps long lines at the runner's 80 columns
    assert result.exit_code == 0, result.output
    assert "warning: model A:" in text and "CalibrationMismatchWarning" not in text
    assert "warnings.warn" not in text  # no source line of the warning


def test_check_set_of_other_checkpoints_is_refused(
    calibrated: tuple[Env, Path, Path, Path],
) -> None:
    env, scores, thresholds, other = calibrated
    config = load_thresholds(thresholds).config
    assert evaluate_thresholds(config, scores, env.batch).labelled > 0  # the same checkpoints
    check = env.root / "check_other.parquet"
    score(env.batch, env.loose, [other, env.b], check, workers=0, device="cpu", quiet=True)
    with pytest.raises(ValueError, match=r"model A was scored with checkpoint sha256 .*calibrated for"):
        evaluate_thresholds(config, check, env.batch)


def test_shipped_thresholds_name_the_shipped_checkpoints() -> None:
    """Replacing a default checkpoint without recalibrating thresholds.yaml fails here."""
    shipped = load_thresholds(REPO / "thresholds.yaml").config
    for name in shipped.model_names():
        sidecar = REPO / "checkpoints" / f"prf_model_{name.lower()}.pt.sha256"
        assert shipped.models[name].calibrated_for_sha256 == sidecar.read_text().split()[0]
