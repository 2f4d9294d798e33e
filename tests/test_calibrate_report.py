"""Tests for ``prf calibrate`` and ``prf report``, and the three typer commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from test_score import LOOSE, Env, make_env
from typer.testing import CliRunner

from prf import cli_score
from prf.calibrate import calibrate, load_labels
from prf.report import report
from prf.score_io import METADATA_KEY, scores_schema
from prf.thresholds import load_thresholds

SOURCE = """
combine: all
models:
  A: {checkpoint: ckpt/a.pt, pa_mpjpe_max: 500, s_mpjpe_max: null, pck: {alpha: 0.1, min: 50}}
  B: {pa_mpjpe_max: 500, s_mpjpe_max: null, pck: {alpha: 0.1, normalization: bbox, min: 50}}
"""


def synthetic_scores(path: Path, n: int = 300, seed: int = 0, failure_rate: float = 0.3) -> np.ndarray:
    """A SCORES file whose failures are separable: half have a large A PA-MPJPE, half a low B PCK.

    Returns (n,) bool, True for a failure.
    """
    rng = np.random.default_rng(seed)
    failure = rng.random(n) < failure_rate
    kind = rng.integers(0, 2, n)
    rows = []
    for i in range(n):
        a_pa, b_pck = rng.uniform(40.0, 80.0), rng.uniform(96.0, 100.0)
        if failure[i] and kind[i] == 0:
            a_pa = rng.uniform(90.0, 150.0)
        if failure[i] and kind[i] == 1:
            b_pck = rng.uniform(60.0, 94.0)
        row = {"image_id": f"im{i:04d}", "image": f"/data/im{i:04d}.png", "status": "ok", "reason": "",
               "keep": True, "mask_area": 900.0, "source_index": i, "keypoints_2d": None}  # fmt: skip
        for name, pa_mpjpe, pck in (
            ("A", a_pa, rng.uniform(96.0, 100.0)),
            ("B", rng.uniform(40.0, 80.0), b_pck),
        ):
            row.update({f"{name}_pa_mpjpe": pa_mpjpe, f"{name}_s_mpjpe": rng.uniform(100.0, 400.0),
                        f"{name}_pck": pck, f"{name}_max_kp_error": rng.uniform(0.05, 0.3),
                        f"{name}_keep": True, f"{name}_keypoints_2d": None})  # fmt: skip
        rows.append(row)
    rows.append({**rows[0], "image_id": "broken", "status": "error", "reason": "unreadable"})
    provenance = {
        "thresholds": {"content": SOURCE, "sha256": "0" * 64},
        "models": [{"name": "A", "sha256": "a" * 64}, {"name": "B", "sha256": "b" * 64}],
        "input": "/data",
    }
    schema = scores_schema(["A", "B"]).with_metadata({METADATA_KEY: json.dumps(provenance).encode()})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return failure


def labels_csv(path: Path, failure: np.ndarray) -> Path:
    """A labels CSV for the ``im0000``, ``im0001``, ... rows of a synthetic SCORES file: keep 1 / 0."""
    ids = [f"im{i:04d}" for i in range(len(failure))]
    pd.DataFrame({"image_id": ids, "keep": (~failure).astype(int)}).to_csv(path, index=False)
    return path


def apply_thresholds(path: Path, scores: pd.DataFrame) -> np.ndarray:
    """Final keep verdicts of a thresholds file on a scores table (ok rows)."""
    config = load_thresholds(path).config
    verdicts = []
    for name, model in config.models.items():
        keep = np.ones(len(scores), dtype=bool)
        for check in model.checks():
            keep &= np.array([check.passes(v) for v in scores[f"{name}_{check.metric}"]])
        verdicts.append(keep)
    return np.all(verdicts, axis=0) if config.combine == "all" else np.any(verdicts, axis=0)


def test_calibrate_separates_a_labelled_table(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores)
    labels = tmp_path / "labels.csv"
    ids = [f"im{i:04d}" for i in range(len(failure))]
    pd.DataFrame({"image_id": ids, "keep": np.where(failure, "reject", "keep")}).to_csv(labels, index=False)
    result = calibrate(scores, labels, out=tmp_path / "th.yaml")
    assert (result.labelled, result.failures) == (len(failure), int(failure.sum()))
    assert result.f1 == 1.0 and result.precision == 1.0 and result.recall == 1.0 and result.mcc == 1.0
    a, b = result.config.models["A"], result.config.models["B"]
    assert 80.0 <= a.pa_mpjpe_max < 90.0 and 94.0 <= b.pck.min <= 96.0  # between the two classes
    assert a.checkpoint == "ckpt/a.pt" and b.pck.normalization == "bbox" and b.pck.alpha == 0.1
    assert a.s_mpjpe_max is None and a.pck is None and b.pa_mpjpe_max is None  # no help: left off
    table = pq.read_table(scores).to_pandas().iloc[: len(failure)]
    assert (apply_thresholds(tmp_path / "th.yaml", table) == ~failure).all()  # the file does what it says
    assert "prf calibrate" in (tmp_path / "th.yaml").read_text()
    assert result.plot == tmp_path / "th.roc.png" and cv2.imread(str(result.plot)) is not None


def test_calibrate_counts_rejected_failures_by_type(tmp_path: Path) -> None:
    """With a failure_type column: per-type (rejected, total) that add up to the overall recall, in the
    result and in the thresholds file's header; types of images labelled keep are ignored."""
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores)
    ids = [f"im{i:04d}" for i in range(len(failure))]
    kinds = np.where(np.arange(len(failure)) % 2 == 0, "leg_swap", "head_turn")
    kinds = np.where(failure, kinds, np.where(np.arange(len(failure)) % 3 == 0, "leg_swap", "none"))
    labels = tmp_path / "labels.csv"
    keep = np.where(failure, "reject", "keep")
    frame = pd.DataFrame({"image_id": ids, "keep": keep, "failure_type": kinds})
    frame.iloc[: len(failure) // 2].to_csv(labels, index=False)  # half labelled: the rest left out
    result = calibrate(scores, labels, out=tmp_path / "th.yaml", metrics=["pck"])  # B's PCK: kind 1 only
    half = failure[: len(failure) // 2]
    assert set(result.rejected_by_type) == {"head_turn", "leg_swap"}
    totals = {k: int((half & (kinds[: len(half)] == k)).sum()) for k in ("head_turn", "leg_swap")}
    assert {k: n for k, (_, n) in result.rejected_by_type.items()} == totals
    rejected = sum(r for r, _ in result.rejected_by_type.values())
    assert rejected == round(result.recall * result.failures) and 0 < rejected < result.failures
    assert "Failures rejected by type: head_turn " in (tmp_path / "th.yaml").read_text()
    plain = tmp_path / "plain.csv"
    frame.drop(columns="failure_type").to_csv(plain, index=False)
    assert calibrate(scores, plain, out=tmp_path / "p.yaml").rejected_by_type == {}


@pytest.mark.parametrize("objective", ["f1", "mcc"])
def test_calibrate_combines_metrics_when_rejecting_everything_looks_best_at_first(
    tmp_path: Path, objective: str
) -> None:
    # 70% failures, half seen only by A's PA-MPJPE and half only by B's PCK: each metric alone reaches F1
    # 0.67 but rejecting everything reaches 0.82, so a greedy search from "keep all" stops at "reject all".
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores, seed=2, failure_rate=0.7)
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"image_id": [f"im{i:04d}" for i in range(len(failure))], "keep": (~failure).astype(int)}
    ).to_csv(labels, index=False)
    result = calibrate(scores, labels, out=tmp_path / "th.yaml", objective=objective)
    # "reject all" would give F1 0.82; not exactly 1.0: the candidates are 256 quantiles of 301 values
    assert result.f1 > 0.99 and result.precision > 0.99 and result.recall > 0.99
    assert result.config.models["A"].pa_mpjpe_max is not None and result.config.models["B"].pck is not None
    with pytest.raises(ValueError, match="unknown objective"):
        calibrate(scores, labels, out=tmp_path / "x.yaml", objective="accuracy")


def test_a_model_whose_metrics_do_not_help_keeps_one_loose_threshold(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores)
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"image_id": [f"im{i:04d}" for i in range(len(failure))], "keep": (~failure).astype(int)}
    ).to_csv(labels, index=False)
    result = calibrate(scores, labels, out=tmp_path / "th.yaml", metrics=["pa_mpjpe"])
    b_values = pq.read_table(scores, columns=["B_pa_mpjpe"]).column(0).to_numpy()
    assert result.config.models["B"].pa_mpjpe_max >= b_values.max()  # B (noise here) rejects nothing
    assert 80.0 <= result.config.models["A"].pa_mpjpe_max < 90.0


def rewrite_scores(path: Path, frame: pd.DataFrame | None = None, **provenance: object) -> None:
    """Rewrite a SCORES file with changed rows (``frame``) and / or provenance keys."""
    table = pq.read_table(path)
    meta = {**json.loads(table.schema.metadata[METADATA_KEY]), **provenance}
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    rows = table if frame is None else pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False)
    pq.write_table(rows.cast(schema), path)


def test_calibrate_with_combine_any_gives_every_model_a_threshold(tmp_path: Path) -> None:
    # failures look bad to both models; a third of the faithful images to one model only: "any" (keep
    # what either model keeps) separates them exactly, but only with a threshold on each model at once
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores, seed=3)
    n, rng = len(failure), np.random.default_rng(3)
    one_model = rng.integers(0, 3, n)  # 1: A's PA-MPJPE looks bad, 2: B's PCK looks bad
    a_bad, b_bad = failure | (one_model == 1), failure | (one_model == 2)
    frame = pq.read_table(scores).to_pandas()
    frame.loc[: n - 1, "A_pa_mpjpe"] = np.where(a_bad, rng.uniform(90, 150, n), rng.uniform(40, 80, n))
    frame.loc[: n - 1, "B_pck"] = np.where(b_bad, rng.uniform(60, 94, n), rng.uniform(96, 100, n))
    source = SOURCE.replace("combine: all", "combine: any")
    rewrite_scores(scores, frame, thresholds={"content": source, "sha256": "0" * 64})
    labels = labels_csv(tmp_path / "labels.csv", failure)
    for objective in ("f1", "mcc"):
        result = calibrate(
            scores, labels, out=tmp_path / "th.yaml", metrics=["pa_mpjpe", "pck"], objective=objective
        )
        assert result.config.combine == "any" and result.f1 == 1.0 and result.mcc == 1.0, objective
        assert (apply_thresholds(tmp_path / "th.yaml", frame.iloc[:n]) == ~failure).all()


def test_calibrate_names_the_scored_checkpoints_relative_to_the_written_file(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores)
    labels = labels_csv(tmp_path / "labels.csv", failure)
    source = tmp_path / "src" / "thresholds.yaml"  # SOURCE's A checkpoint ckpt/a.pt is relative to it
    scored_a = tmp_path / "models" / "a.pt"
    models = [
        {"name": "A", "sha256": "a" * 64, "checkpoint": str(scored_a)},
        {"name": "B", "sha256": "b" * 64},
    ]
    rewrite_scores(
        scores, thresholds={"content": SOURCE, "sha256": "0" * 64, "path": str(source)}, models=models
    )
    out = tmp_path / "out" / "th.yaml"
    written = calibrate(scores, labels, out=out).config.models
    # A: the checkpoint that made the SCORES; B: none scored from a path, none in the source file
    assert written["A"].checkpoint == "../models/a.pt" and written["B"].checkpoint is None
    assert load_thresholds(out).checkpoint_path("A").resolve() == scored_a.resolve()
    # a SCORES file that records no checkpoint path: the source file's key, now relative to the new file
    rewrite_scores(scores, models=[{"name": m["name"], "sha256": m["sha256"]} for m in models])
    assert calibrate(scores, labels, out=out).config.models["A"].checkpoint == "../src/ckpt/a.pt"


def test_calibrate_target_precision_keeps_more_and_reaches_the_target(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    failure = synthetic_scores(scores, seed=1)
    noisy = failure.copy()
    noisy[:30] = ~noisy[:30]  # label noise: no threshold separates perfectly any more
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"image_id": [f"im{i:04d}" for i in range(len(noisy))], "keep": (~noisy).astype(int)}
    ).to_csv(labels, index=False)
    best_f1 = calibrate(scores, labels, out=tmp_path / "f1.yaml")
    loose = calibrate(scores, labels, target_precision=0.8, out=tmp_path / "p.yaml", plot=tmp_path / "p.png")
    assert loose.keep_precision >= 0.8 and loose.kept >= best_f1.kept
    table = pq.read_table(scores).to_pandas().iloc[: len(noisy)]
    kept = apply_thresholds(tmp_path / "p.yaml", table)
    assert kept.sum() == loose.kept and (~noisy[kept]).mean() >= 0.8
    strict = calibrate(scores, labels, target_precision=1.0, out=tmp_path / "strict.yaml")
    assert strict.keep_precision == 1.0 and 0 < strict.kept < loose.kept


def test_labels_from_csv_and_batch(tmp_path: Path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text("image_id,keep\na,1\nb,0\nc,keep\nd,Reject\n")
    assert load_labels(csv) == {"a": False, "b": True, "c": False, "d": True}
    csv.write_text("image_id,keep\na,maybe\n")
    with pytest.raises(ValueError, match="line 2: keep must be"):
        load_labels(csv)
    csv.write_text("id,label\na,1\n")
    with pytest.raises(ValueError, match="needs columns image_id and keep"):
        load_labels(csv)


def make_app() -> typer.Typer:
    """A local app with the three commands, registered the way prf/cli.py does."""
    app = typer.Typer()
    for name in ("score", "calibrate", "report"):
        app.command(name)(getattr(cli_score, name))
    return app


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Env, Path]:
    """A real (tiny, untrained) scoring run through the typer command."""
    env = make_env(tmp_path_factory.mktemp("cli"), n=6)
    app = make_app()
    out = env.root / "run" / "scores.parquet"
    args = ["score", str(env.batch), "--thresholds", str(env.loose), "--models", f"{env.a},{env.b}"]
    result = CliRunner().invoke(
        app, [*args, "--out", str(out), "--workers", "0", "--quiet", "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "per-model agreement" in result.output
    return env, out


def test_report_writes_html_and_pngs(scored: tuple[Env, Path], tmp_path: Path) -> None:
    _, out = scored
    index = report(out, tmp_path / "report", per_sheet=4)
    page = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert pngs == ["kept.png", "metric_max_kp_error.png", "metric_pa_mpjpe.png", "metric_pck.png",
                    "metric_s_mpjpe.png"]  # fmt: skip
    for name in pngs:
        assert f'src="{name}"' in page and cv2.imread(str(index.parent / name)) is not None
    sheet = cv2.imread(str(index.parent / "kept.png"))
    assert sheet.shape[:2] == (160, 4 * 2 * 160)  # 4 images x 2 models, one row of 160 px tiles
    assert "Rejected images (0 shown)" in page and "Kept images (4 shown)" in page


def test_cli_calibrate_and_report_and_friendly_errors(scored: tuple[Env, Path], tmp_path: Path) -> None:
    env, out = scored
    app = make_app()
    runner = CliRunner()
    th = tmp_path / "th.yaml"
    result = runner.invoke(app, ["calibrate", str(out), "--labels", str(env.batch), "--out", str(th)])
    assert result.exit_code == 0, result.output
    assert load_thresholds(th).config.model_names() == ["A", "B"] and th.with_suffix(".roc.png").is_file()
    # the written file names the checkpoints it was calibrated for: prf score finds them without --models
    again = tmp_path / "again" / "scores.parquet"
    args = [
        "score",
        str(env.batch),
        "--thresholds",
        str(th),
        "--out",
        str(again),
        "--quiet",
        "--workers",
        "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "r"), "--per-sheet", "2"])
    assert result.exit_code == 0 and (tmp_path / "r" / "index.html").is_file()
    for args, phrase in (
        (["report", str(out), "--per-sheet", "0"], "--per-sheet must be >= 1"),
        (["report", str(out), "--out", str(th)], "is a file"),
        (["calibrate", str(out), "--labels", str(env.batch), "--out", str(tmp_path)], "is a folder"),
        # an existing thresholds file (the default --out is the one prf score uses) is not replaced silently
        (["calibrate", str(out), "--labels", str(env.batch), "--out", str(th)], "pass --force to replace it"),
        (["report", str(th)], "is it a SCORES file from prf score?"),
    ):
        result = runner.invoke(app, args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and phrase in text and "Traceback" not in text, (args, result.output)
    # a metric named twice is one threshold
    args = ["calibrate", str(out), "--labels", str(env.batch), "--out", str(th), "--force"]
    assert runner.invoke(app, [*args, "--metric", "pck", "--metric", "pck"]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(LOOSE.replace("min: 0}", "min: 0, extra: 1}"))
    result = runner.invoke(
        app, ["score", str(env.batch), "--thresholds", str(bad), "--models", f"{env.a},{env.b}"]
    )
    text = " ".join(result.output.split())  # rich wraps long lines at the runner's 80 columns
    assert result.exit_code == 2 and "models.A.pck.extra: unknown key" in text and "Traceback" not in text
    result = runner.invoke(app, ["calibrate", str(tmp_path / "none.parquet"), "--labels", str(env.batch)])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_friendly_errors_keep_square_brackets_in_paths(tmp_path: Path) -> None:
    """Rich markup must not eat a folder named like a style tag ("[run1]") in the one-line error."""
    bad = tmp_path / "[run1]" / "th.yaml"
    bad.parent.mkdir()
    bad.write_text(LOOSE.replace("min: 0}", "min: 0, extra: 1}"))
    result = CliRunner().invoke(make_app(), ["score", str(tmp_path), "--thresholds", str(bad)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "[run1]" in text and "models.A.pck.extra: unknown key" in text
    scores = bad.parent / "scores.parquet"  # and the "wrote ..." line of a command that succeeds
    labels = labels_csv(bad.parent / "labels.csv", synthetic_scores(scores))
    out = bad.parent / "th_new.yaml"
    args = ["calibrate", str(scores), "--labels", str(labels), "--out", str(out)]
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    assert str(out) in "".join(result.output.split())  # however Rich wrapped it (tmp paths have no spaces)


def test_a_sigterm_that_lightning_turned_into_an_exit_is_not_a_success() -> None:
    # Lightning answers SIGTERM by raising SIGTERMException, a SystemExit without a code (exit status 0)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from prf.cli import SIGTERM_EXIT_CODE, friendly_errors

    def preempted() -> None:
        raise SIGTERMException

    app = typer.Typer()
    app.command("train")(friendly_errors(preempted))
    result = CliRunner().invoke(app, [])
    assert result.exit_code == SIGTERM_EXIT_CODE == 143 and "rerun the same command" in result.output

    def finished_early() -> None:
        raise SystemExit(0)  # any other exit passes through as it is

    app = typer.Typer()
    app.command("x")(friendly_errors(finished_early))
    assert CliRunner().invoke(app, []).exit_code == 0


def test_summary_error_rows_keep_square_brackets() -> None:
    from rich.console import Console

    from prf.score_io import ScoreSummary

    summary = ScoreSummary(Path("s.parquet"), ["A"], "all", total=1, errored=1,
                           errors=[("im0", "runs/[run1]/im0.png: unreadable image")])  # fmt: skip
    console = Console(record=True, width=200)
    console.print(summary.renderable())
    assert "runs/[run1]/im0.png: unreadable image" in console.export_text()


def test_calibrate_reports_each_model_alone(tmp_path: Path) -> None:
    """In the synthetic table A sees only one kind of failure and B only the other: each alone rejects
    no faithful image but misses the other kind, and only together do they reach MCC 1 -- on the
    calibration images and on a check set the thresholds were not fitted to."""
    scores, check = tmp_path / "scores.parquet", tmp_path / "check.parquet"
    failure = synthetic_scores(scores)
    check_failure = synthetic_scores(check, seed=1)
    labels, check_labels = (
        labels_csv(tmp_path / "l.csv", failure),
        labels_csv(tmp_path / "c.csv", check_failure),
    )
    result = calibrate(
        scores, labels, out=tmp_path / "th.yaml", check_scores=check, check_labels=check_labels
    )
    for alone, mcc in ((result.alone, result.mcc), (result.check.alone, result.check.mcc)):
        assert set(alone) == {"A", "B"} and mcc == 1.0
        for figures in alone.values():
            assert figures["precision"] == 1.0 and figures["fpr"] == 0.0
            assert 0.2 < figures["recall"] < 0.8 and figures["mcc"] < mcc
        assert alone["A"]["recall"] + alone["B"]["recall"] == pytest.approx(1.0)  # the two kinds
    lines = (tmp_path / "th.yaml").read_text().splitlines()
    header = " ".join(line.lstrip("# ").strip() for line in lines if line.startswith("#"))  # unwrapped
    calibration_part, check_part = header.split("On the check set")
    assert "Each model alone (Matthews correlation / F1): A " in calibration_part
    assert "Each model alone (Matthews correlation / F1): A " in check_part
