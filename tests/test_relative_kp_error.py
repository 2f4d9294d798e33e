"""The per-keypoint ("relative") maximum keypoint error: thresholds schema, scoring, calibration, SCORES.

``max_rel_kp_error`` divides each keypoint's 2D error by that keypoint's typical error on faithful images
(``max_relative_keypoint_error.scales``), so that a precise keypoint moved a little counts as much as a
noisy paw moved a lot. The checkpoints are tiny UNTRAINED regressors; where values matter, an oracle
regressor that returns the annotation (moved on purpose) stands in for the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_calibrate_report import labels_csv
from test_score import Env, make_env, oracle_regressor

import prf.score as score_module
from prf.body.layout import NUM_KEYPOINTS
from prf.calibrate import (
    MIN_SCALE_IMAGES,
    calibrate,
    evaluate_thresholds,
    keypoint_error_scales,
    relative_errors,
)
from prf.data.inputs import iter_samples
from prf.report import report
from prf.score import load_models, score, score_batch
from prf.score_data import collate_items, load_item
from prf.score_io import METADATA_KEY, merge, scores_schema
from prf.thresholds import (
    NUM_KEYPOINTS as THRESHOLDS_KEYPOINTS,
)
from prf.thresholds import (
    ThresholdsError,
    dump_thresholds,
    load_thresholds,
    parse_thresholds,
)

NECK, LEFT_FRONT_PAW = 18, 3
SCALES = [0.1] * NUM_KEYPOINTS
SCALES[NECK] = 0.01  # a precise keypoint: 0.05 sqrt(A) off is five times its usual error


def relative_file(scales: list[float] = SCALES, limit: float = 2.0, plain_limit: float | None = None) -> str:
    return f"""
models:
  A:
    pa_mpjpe_max: null
    s_mpjpe_max: null
    pck: null
    max_keypoint_error_max: {json.dumps(plain_limit)}
    max_relative_keypoint_error: {{max: {limit}, scales: {json.dumps(scales)}}}
  B: {{pa_mpjpe_max: 100000, s_mpjpe_max: null, pck: null}}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    # 48 images, about half faithful: enough for calibrate to measure most keypoints' own scales
    return make_env(tmp_path_factory.mktemp("relative"), n=48)


def test_the_thresholds_file_takes_the_relative_error_and_names_bad_keys() -> None:
    assert THRESHOLDS_KEYPOINTS == NUM_KEYPOINTS  # prf.thresholds keeps its own copy (no torch import)
    config = parse_thresholds(relative_file()).config
    relative = config.models["A"].max_relative_keypoint_error
    assert relative is not None and relative.max == 2.0 and relative.scales == SCALES
    assert [c.metric for c in config.models["A"].checks()] == ["max_rel_kp_error"]
    assert config.models["B"].max_relative_keypoint_error is None  # optional, off by default
    text = dump_thresholds(config)
    assert parse_thresholds(text).config == config  # what is written loads back the same
    assert sum("scales: [" in line for line in text.splitlines()) == 1  # a flow list, not 26 "- x" lines
    for bad, key in (
        (relative_file(SCALES[:-1]), "models.A.max_relative_keypoint_error.scales"),
        (relative_file([0.0, *SCALES[1:]]), "models.A.max_relative_keypoint_error.scales"),
        (relative_file(limit=-1.0), "models.A.max_relative_keypoint_error.max"),
        (relative_file().replace("max: 2.0, ", ""), "models.A.max_relative_keypoint_error.max"),
    ):
        with pytest.raises(ThresholdsError, match=key.replace(".", r"\.")):
            parse_thresholds(bad)


def test_scoring_writes_per_keypoint_errors_and_the_relative_maximum(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An oracle regressor returns the annotation with the neck moved 0.05 and a paw 0.08 sqrt(A):
    the plain maximum sees the paw (0.08 > 0.07), the relative one the neck (0.05 / 0.01 = 5 > 2), and
    the reject reason names both keypoints."""
    thresholds_path = tmp_path / "relative.yaml"
    thresholds_path.write_text(relative_file(plain_limit=0.07))
    thresholds = load_thresholds(thresholds_path)
    models, specs = load_models(thresholds, {"A": env.a, "B": env.b}, torch.device("cpu"), None)
    batch = collate_items([load_item(ref, specs, 35) for ref in iter_samples(env.batch)])
    visible = batch["keypoints_2d"][:, :, 2].numpy() > 0
    moved = {NECK: 0.05, LEFT_FRONT_PAW: 0.08}
    monkeypatch.setattr(score_module, "run_regressor", oracle_regressor(batch, specs, moved, axis=1))
    rows = score_batch(models, batch, "all")
    assert any(vis[NECK] for vis in visible)
    for row, vis in zip(rows, visible, strict=True):
        errors = np.asarray(row["A_keypoint_errors"], dtype=float)
        expected = np.where(vis, 0.0, np.nan)
        expected[[NECK, LEFT_FRONT_PAW]] = np.where(vis[[NECK, LEFT_FRONT_PAW]], [0.05, 0.08], np.nan)
        np.testing.assert_allclose(errors, expected, atol=1e-4)  # NaN exactly where not visible
        assert np.isnan(row["B_max_rel_kp_error"])  # B's thresholds set no scales: not computed
        relative = np.nanmax(np.where(vis, errors / np.array(SCALES), np.nan))
        assert row["A_max_rel_kp_error"] == pytest.approx(relative, abs=1e-3)
        assert row["A_max_kp_error"] == pytest.approx(np.nanmax(errors), abs=1e-4)
        failed = []
        if vis[LEFT_FRONT_PAW]:
            failed.append("max_kp_error 0.08 > 0.07 at left_front_paw")
        if vis[NECK]:
            assert row["A_max_rel_kp_error"] == pytest.approx(5.0, abs=1e-3)
            failed.append("max_rel_kp_error 5 > 2 at neck")
        assert row["reason"] == (f"A: {', '.join(failed)}" if failed else "")
        assert row["keep"] == (not failed)


def test_a_run_stores_the_columns_and_calibrate_reads_them(env: Env, tmp_path: Path) -> None:
    """End to end with the untrained checkpoints: SCORES carry the per-keypoint errors, calibrate measures
    the scales from the faithful images' errors and chooses a maximum, and scoring with the written file
    gives exactly the metric calibrate searched."""
    loose = tmp_path / "loose.yaml"
    loose.write_text(relative_file(limit=1e6))
    out = tmp_path / "scores.parquet"
    score(env.batch, thresholds_path=loose, models=[env.a, env.b], out=out, batch_size=4, quiet=True)
    table = pq.read_table(out).to_pandas()
    errors = np.stack(table["A_keypoint_errors"].to_numpy()).astype(float)
    assert errors.shape == (len(table), NUM_KEYPOINTS)
    np.testing.assert_allclose(
        table["A_max_rel_kp_error"], relative_errors(errors, np.array(SCALES)), rtol=1e-5
    )
    manifest = pd.read_parquet(env.batch / "manifest.parquet")
    faithful = table["image_id"].isin(manifest.loc[manifest["injected_failure"] == "none", "image_id"])
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": table["image_id"], "keep": faithful.astype(int)}).to_csv(labels, index=False)
    result = calibrate(out, labels, out=tmp_path / "th.yaml", metrics=["max_rel_kp_error"])
    relative = result.config.models["A"].max_relative_keypoint_error
    assert relative is not None
    good = errors[faithful.to_numpy()]
    seen = np.isfinite(good).sum(axis=0) >= MIN_SCALE_IMAGES
    assert seen.any() and not seen.all()  # both rules below are used
    medians = np.nanmedian(good[:, seen], axis=0)
    expected = np.full(NUM_KEYPOINTS, np.median(medians))
    expected[seen] = medians  # rarely seen: the pooled median
    np.testing.assert_allclose(relative.scales, expected, rtol=5e-4)
    rescored = tmp_path / "rescored.parquet"
    score(env.batch, thresholds_path=tmp_path / "th.yaml", models=[env.a, env.b], out=rescored,
          batch_size=4, quiet=True)  # fmt: skip
    again = pq.read_table(rescored).to_pandas()
    np.testing.assert_allclose(
        again["A_max_rel_kp_error"], relative_errors(errors, np.array(relative.scales)), rtol=1e-5
    )


def test_labels_of_another_batch_are_refused(env: Env, tmp_path: Path) -> None:
    """BATCH image ids repeat across batches: another batch's labels would match every row silently."""
    out = tmp_path / "scores.parquet"
    score(env.batch, thresholds_path=env.loose, models=[env.a, env.b], out=out, batch_size=8, quiet=True)
    other = tmp_path / "other_batch"
    other.mkdir()
    with pytest.raises(ValueError, match=r"scored the BATCH .* but the labels are those of the BATCH"):
        calibrate(out, other, out=tmp_path / "th.yaml")
    config = load_thresholds(env.loose).config
    with pytest.raises(ValueError, match="scored the BATCH"):
        evaluate_thresholds(config, out, other)
    assert evaluate_thresholds(config, out, env.batch).labelled == len(pq.read_table(out))


def test_scales_are_medians_of_faithful_errors_and_rare_keypoints_take_the_pooled_median() -> None:
    rng = np.random.default_rng(0)
    n = 200
    errors = rng.uniform(0.5, 1.5, (n, NUM_KEYPOINTS)) * np.linspace(0.01, 0.2, NUM_KEYPOINTS)
    faithful = np.arange(n) % 2 == 0
    errors[~faithful] *= 10.0  # failures do not move the scales
    errors[:, 5] = np.nan
    errors[0 : 2 * (MIN_SCALE_IMAGES - 1) : 2, 5] = 0.05  # seen on MIN_SCALE_IMAGES - 1 faithful images
    errors[1::2, 5] = 1.0  # seen on every failure, which does not count
    scales = keypoint_error_scales(errors, faithful)
    medians = np.nanmedian(errors[faithful], axis=0)
    others = np.delete(np.arange(NUM_KEYPOINTS), 5)
    np.testing.assert_allclose(scales[others], medians[others], rtol=5e-4)  # 4 significant digits
    assert scales[5] == pytest.approx(np.median(medians[others]), rel=5e-4)
    assert np.isnan(relative_errors(np.full((1, NUM_KEYPOINTS), np.nan), scales)).all()
    with pytest.raises(ValueError, match="cannot measure keypoint error scales"):
        keypoint_error_scales(errors[:30], faithful[:30])


def write_keypoint_scores(path: Path, errors: list[np.ndarray], gaps: list[np.ndarray] | None = None) -> None:
    """A SCORES file of models A and B (same values for both) with the given per-image (K,) keypoint
    errors and, optionally, flip gaps; the other metrics are constant and every row is ``ok``."""
    rows = []
    for i, image_errors in enumerate(errors):
        image_gaps = gaps[i].tolist() if gaps is not None else None
        row = {"image_id": f"im{i:04d}", "image": f"im{i:04d}.png", "status": "ok", "reason": "",
               "keep": True, "mask_area": 900.0, "source_index": i}  # fmt: skip
        for name in ("A", "B"):
            row.update({f"{name}_pa_mpjpe": 50.0, f"{name}_s_mpjpe": 100.0, f"{name}_pck": 100.0,
                        f"{name}_max_kp_error": float(image_errors.max()), f"{name}_keep": True,
                        f"{name}_keypoint_errors": image_errors.tolist(),
                        f"{name}_keypoint_flip_gaps": image_gaps})  # fmt: skip
        rows.append(row)
    source = "models:\n  A: {pa_mpjpe_max: 500, s_mpjpe_max: null, pck: null}\n" + (
        "  B: {pa_mpjpe_max: 500, s_mpjpe_max: null, pck: null}\n"
    )
    provenance = {
        "thresholds": {"content": source, "sha256": "0" * 64},
        "models": [{"name": n, "checkpoint": f"{n}.pt", "sha256": n.lower() * 64} for n in "AB"],
        "input": "/data",
    }
    schema = scores_schema(["A", "B"]).with_metadata({METADATA_KEY: json.dumps(provenance).encode()})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def synthetic_keypoint_scores(path: Path, n: int = 400, seed: int = 0) -> np.ndarray:
    """SCORES whose failures move one PRECISE keypoint less than the noisy ones move on faithful images:
    the plain maximum cannot separate them, the relative one can. Returns (n,) bool, True = failure."""
    rng = np.random.default_rng(seed)
    typical = np.full(NUM_KEYPOINTS, 0.02)
    typical[[3, 4, 5, 6, 19]] = 0.12  # paws and the tail tip: noisy
    failure = rng.random(n) < 0.4
    errors = []
    for i in range(n):
        image_errors = typical * rng.uniform(0.5, 1.5, NUM_KEYPOINTS)
        if failure[i]:
            image_errors[rng.choice([8, 9, 18])] = 0.09  # an elbow or the neck, 4.5x its usual error
        errors.append(image_errors)
    write_keypoint_scores(path, errors)
    return failure


def test_calibrate_finds_what_only_the_relative_error_separates(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    failure = synthetic_keypoint_scores(scores)
    labels = labels_csv(tmp_path / "labels.csv", failure)
    plain = calibrate(scores, labels, out=tmp_path / "plain.yaml", metrics=["max_kp_error"])
    relative = calibrate(scores, labels, out=tmp_path / "relative.yaml", metrics=["max_rel_kp_error"])
    assert plain.f1 < 0.8 and relative.f1 == 1.0 and relative.mcc == 1.0 and plain.mcc < 0.8
    chosen = relative.config.models["A"].max_relative_keypoint_error
    assert chosen is not None and 1.5 <= chosen.max < 4.5  # between faithful (<= 1.5x) and failures (4.5x)
    table = pq.read_table(scores).to_pandas()
    errors = np.stack(table["A_keypoint_errors"].to_numpy()).astype(float)
    np.testing.assert_allclose(chosen.scales, np.median(errors[~failure], axis=0), rtol=5e-4)
    written = load_thresholds(tmp_path / "relative.yaml").config
    assert written.models["A"].max_relative_keypoint_error == chosen
    assert "max_relative_keypoint_error" in (tmp_path / "relative.yaml").read_text()


def test_older_scores_without_the_new_columns_still_merge_report_and_explain(tmp_path: Path) -> None:
    """A part file or SCORES written before the per-keypoint columns existed: the merge fills them with
    nulls, the report leaves the metric out, and calibrating it names what is missing."""
    scores = tmp_path / "scores.parquet"
    synthetic_keypoint_scores(scores, n=60)
    table = pq.read_table(scores)
    provenance = json.loads(table.schema.metadata[METADATA_KEY])
    new = [c for c in table.column_names if c.endswith(("_keypoint_errors", "_max_rel_kp_error"))]
    old = table.drop_columns(new)
    old_path = tmp_path / "old.parquet"
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), old_path)
    merged = tmp_path / "merged.parquet"
    assert merge(merged, [old_path], scores_schema(["A", "B"]), provenance) == 60
    back = pq.read_table(merged)
    assert back.schema.names == scores_schema(["A", "B"]).names
    assert back.column("A_keypoint_errors").null_count == 60
    assert back.column("A_pa_mpjpe").to_pylist() == old.column("A_pa_mpjpe").to_pylist()
    index = report(old_path, tmp_path / "report", per_sheet=2)
    assert not (index.parent / "metric_max_rel_kp_error.png").exists()
    assert (index.parent / "metric_max_kp_error.png").exists()
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": old.column("image_id").to_pylist(), "keep": 1}).to_csv(labels, index=False)
    with pytest.raises(ValueError, match=r"A_keypoint_errors.*score again"):
        calibrate(old_path, labels, out=tmp_path / "th.yaml", metrics=["max_rel_kp_error"])


def test_calibrate_judges_its_thresholds_on_a_check_set_it_never_fits(tmp_path: Path) -> None:
    """``--check-scores``: the chosen thresholds' verdicts on a second labelled SCORES file equal the
    thresholds file applied by hand to it, for a plain and a relative metric; mismatches are errors."""
    scores, check = tmp_path / "scores.parquet", tmp_path / "check.parquet"
    labels = labels_csv(tmp_path / "labels.csv", synthetic_keypoint_scores(scores, seed=0))
    check_failure = synthetic_keypoint_scores(check, seed=1)
    check_labels = labels_csv(tmp_path / "check.csv", check_failure)
    table = pq.read_table(check).to_pandas()
    for metric in ("max_kp_error", "max_rel_kp_error"):
        out = tmp_path / f"{metric}.yaml"
        result = calibrate(
            scores,
            labels,
            out=out,
            metrics=[metric],
            objective="mcc",
            check_scores=check,
            check_labels=check_labels,
        )
        config = load_thresholds(out).config
        keep = np.ones(len(table), dtype=bool)
        for name, model in config.models.items():
            for check_ in model.checks():
                if check_.metric == "max_rel_kp_error":
                    errors = np.stack(table[f"{name}_keypoint_errors"].to_numpy()).astype(float)
                    values = relative_errors(errors, np.array(model.max_relative_keypoint_error.scales))
                else:
                    values = table[f"{name}_{check_.metric}"].to_numpy()
                keep &= np.array([check_.passes(v) for v in values])
        tp, fp = int((~keep & check_failure).sum()), int((~keep & ~check_failure).sum())
        fn, tn = int((keep & check_failure).sum()), int((keep & ~check_failure).sum())
        mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        assert result.check is not None and result.check.labelled == len(table)
        assert result.check.mcc == pytest.approx(mcc) and result.check.f1 == pytest.approx(
            2 * tp / (2 * tp + fp + fn)
        )
        assert result.check.false_positive_rate == pytest.approx(fp / (fp + tn))
        assert "On the check set" in out.read_text()
    assert result.check.mcc == 1.0  # the relative error separates fresh images as well
    with pytest.raises(ValueError, match="give both"):
        calibrate(scores, labels, out=tmp_path / "x.yaml", check_scores=check)
    other = tmp_path / "other.parquet"
    metadata = dict(pq.read_schema(check).metadata)
    provenance = json.loads(metadata[METADATA_KEY])
    provenance["thresholds"]["content"] = provenance["thresholds"]["content"].replace("  B:", "  C:")
    metadata[METADATA_KEY] = json.dumps(provenance).encode()
    pq.write_table(pq.read_table(check).replace_schema_metadata(metadata), other)
    with pytest.raises(ValueError, match=r"models \['A', 'C'\], the thresholds are for \['A', 'B'\]"):
        calibrate(scores, labels, out=tmp_path / "y.yaml", check_scores=other, check_labels=check_labels)


def test_a_check_set_scored_with_another_pck_is_refused(tmp_path: Path) -> None:
    """The check set's pck column is PCK@0.15 (sqrt(mask area)); thresholds on PCK@0.1 cannot use it."""
    check = tmp_path / "check.parquet"
    labels = labels_csv(tmp_path / "check.csv", synthetic_keypoint_scores(check, seed=1))
    config = parse_thresholds(
        "models:\n  A: {pa_mpjpe_max: null, s_mpjpe_max: null, pck: {alpha: 0.1, min: 50}}\n"
        "  B: {pa_mpjpe_max: 500, s_mpjpe_max: null, pck: null}\n"
    ).config
    with pytest.raises(ValueError, match=r"A_pck is PCK@0\.15 \(mask_area\), the thresholds check PCK@0\.1"):
        evaluate_thresholds(config, check, labels)
    config.models["A"].pck.alpha = 0.15  # the same PCK: accepted
    assert evaluate_thresholds(config, check, labels).labelled == 400
