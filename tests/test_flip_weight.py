"""The flip test's per-keypoint disagreement and ``max_relative_keypoint_error.flip_weight``.

With flip test, a keypoint head runs on the crop and on its mirror image; how far apart the two passes put
a keypoint (``<M>_keypoint_flip_gaps``, sqrt(mask area) units) says how sure the network is of it on this
image. ``max_rel_kp_error`` divides keypoint n's error by ``scales[n] + flip_weight * gap_n``, and
``prf calibrate`` picks the weight. The checkpoints are tiny UNTRAINED regressors; where values matter an
oracle regressor (the annotation, moved on purpose) stands in for the network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from test_calibrate_report import labels_csv
from test_relative_kp_error import NECK, SCALES, relative_file, write_keypoint_scores
from test_score import TINY_PARE, Env, make_env, oracle_regressor

import prf.score as score_module
from prf.body.layout import KEYPOINT_FLIP, NUM_KEYPOINTS
from prf.calibrate import FLIP_WEIGHTS, calibrate, choose_flip_weight, evaluate_thresholds, relative_errors
from prf.checkpoint import save_untrained_export
from prf.data.inputs import iter_samples
from prf.models.inference import run_regressor
from prf.predictor import Predictor
from prf.score import load_models, score, score_batch
from prf.score_data import collate_items, load_item
from prf.thresholds import ThresholdsError, dump_thresholds, load_thresholds, parse_thresholds


def flip_file(weight: float, limit: float = 2.0) -> str:
    text = relative_file(limit=limit)
    return text.replace("scales: ", f"flip_weight: {weight}, scales: ")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    """make_env's batch, with model A's checkpoint given a keypoint head (so it runs a flip test); B's
    has none."""
    plain = make_env(tmp_path_factory.mktemp("flip"), n=8)
    head = {**TINY_PARE, "num_keypoints": NUM_KEYPOINTS}
    a = save_untrained_export(plain.root / "a_kp.pt", 64, 0, head, "untrained-64px-keypoints")
    return dataclasses.replace(plain, a=a)


def test_flip_weight_is_optional_non_negative_and_written_back() -> None:
    plain = parse_thresholds(relative_file()).config.models["A"].max_relative_keypoint_error
    assert plain is not None and plain.flip_weight == 0.0  # files from before the key mean "off"
    config = parse_thresholds(flip_file(0.25)).config
    assert config.models["A"].max_relative_keypoint_error.flip_weight == 0.25
    assert parse_thresholds(dump_thresholds(config)).config == config
    with pytest.raises(ThresholdsError, match=r"models\.A\.max_relative_keypoint_error\.flip_weight"):
        parse_thresholds(flip_file(-0.5))


def test_run_regressor_reports_how_far_apart_the_two_passes_put_each_keypoint(env: Env) -> None:
    predictor = Predictor.from_checkpoint(env.a)
    assert predictor.flip_test  # on by default for a head with keypoints
    crops = torch.randn(3, 3, predictor.input_size, predictor.input_size)
    with torch.inference_mode():
        out = run_regressor(predictor.net, predictor.body, crops, flip_test=True)
        unflipped = predictor.net(crops).keypoints_2d
        mirrored = predictor.net(crops.flip(-1)).keypoints_2d[:, list(KEYPOINT_FLIP)] * torch.tensor(
            [-1.0, 1.0]
        )
        without = run_regressor(predictor.net, predictor.body, crops, flip_test=False)
    torch.testing.assert_close(out["keypoints_2d_flip_gap"], unflipped - mirrored)
    torch.testing.assert_close(out["keypoints_2d_detected"], (unflipped + mirrored) / 2)
    assert out["keypoints_2d_flip_gap"].abs().max() > 0  # an untrained net does not mirror itself
    assert without["keypoints_2d_flip_gap"] is None


def oracle_with_gap(batch: dict, specs: list, moved: dict[int, float], gaps: dict[int, float]):
    """``oracle_regressor`` that also reports flip gaps: keypoint n's two passes ``gaps[n]`` sqrt(mask
    area) apart along the image x axis (given in normalised crop coordinates, as run_regressor does)."""
    oracle = oracle_regressor(batch, specs, moved, axis=1)
    size = np.sqrt(batch["mask_area"].numpy())

    def regressor(net, body, crops, crop_cam=None, flip_test=False):
        out = oracle(net, body, crops, crop_cam, flip_test)
        k = [spec.size for spec in specs].index(crops.shape[-1])
        image = np.zeros((len(size), NUM_KEYPOINTS, 2))
        for index, gap in gaps.items():
            image[:, index, 0] = gap * size
        crop = np.einsum("bij,bnj->bni", batch["affines"][k][:, :, :2].numpy(), image)  # a difference
        out["keypoints_2d_flip_gap"] = torch.as_tensor(crop * 2.0 / crops.shape[-1])
        return out

    return regressor


def test_scoring_widens_each_keypoint_scale_by_its_flip_gap(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The neck is 0.05 sqrt(A) off with scale 0.01 (5x) and its two passes 0.04 apart: with flip_weight
    0.25 its scale becomes 0.01 + 0.25 * 0.04 = 0.02, so the relative error is 2.5, not 5."""
    path = tmp_path / "flip.yaml"
    path.write_text(flip_file(0.25, limit=3.0))
    thresholds = load_thresholds(path)
    models, specs = load_models(thresholds, {"A": env.a, "B": env.b}, torch.device("cpu"), None)
    batch = collate_items([load_item(ref, specs, 35) for ref in iter_samples(env.batch)])
    visible = batch["keypoints_2d"][:, :, 2].numpy() > 0
    assert visible[:, NECK].any()
    regressor = oracle_with_gap(batch, specs, {NECK: 0.05}, {NECK: 0.04})
    monkeypatch.setattr(score_module, "run_regressor", regressor)
    for row, vis in zip(score_batch(models, batch, "all"), visible, strict=True):
        gaps = np.asarray(row["A_keypoint_flip_gaps"], dtype=float)
        expected = np.zeros(NUM_KEYPOINTS)
        expected[NECK] = 0.04
        np.testing.assert_allclose(gaps, expected, atol=1e-4)  # every keypoint, seen or not
        if vis[NECK]:
            assert row["A_max_rel_kp_error"] == pytest.approx(2.5, abs=1e-3)
            assert row["A_keep"]  # 2.5 <= 3; without the gap it would be 5 > 3
        else:
            assert row["A_max_rel_kp_error"] == pytest.approx(0.0, abs=1e-4)


def test_a_real_run_writes_the_gaps_and_refuses_a_weight_without_a_flip_test(
    env: Env, tmp_path: Path
) -> None:
    path = tmp_path / "flip.yaml"
    path.write_text(flip_file(0.5, limit=1e6))
    out = tmp_path / "scores.parquet"
    score(env.batch, thresholds_path=path, models=[env.a, env.b], out=out, batch_size=4, quiet=True)
    table = pq.read_table(out).to_pandas()
    errors = np.stack(table["A_keypoint_errors"].to_numpy()).astype(float)
    gaps = np.stack(table["A_keypoint_flip_gaps"].to_numpy()).astype(float)
    assert np.isfinite(gaps).all() and (gaps > 0).any()
    np.testing.assert_allclose(
        table["A_max_rel_kp_error"], relative_errors(errors, np.array(SCALES), gaps, 0.5), rtol=1e-5
    )
    assert table["B_keypoint_flip_gaps"].isna().all()  # no keypoint head: no flip test, no gaps
    # A's weight with B's checkpoint, which has no flip test: refused before any image is scored
    with pytest.raises(ValueError, match=r"models\.A\.max_relative_keypoint_error\.flip_weight is 0\.5.*"
                       r"b\.pt runs without a flip test"):  # fmt: skip
        score(env.batch, thresholds_path=path, models=[env.b, env.a], out=tmp_path / "x.parquet",
              quiet=True)  # fmt: skip
    assert not (tmp_path / "x.parquet").exists()


def gap_scores(path: Path, n: int = 400, seed: int = 0, with_gaps: bool = True) -> np.ndarray:
    """SCORES where every image has one keypoint 0.09 off (4.5x its usual 0.02): on faithful images the
    network is unsure of it (flip gap 0.2), on failures sure (gap 0.005). Only the flip gap separates
    them. Returns (n,) bool, True = failure."""
    rng = np.random.default_rng(seed)
    failure = rng.random(n) < 0.4
    errors, gaps = [], []
    for i in range(n):
        image_errors = 0.02 * rng.uniform(0.5, 1.5, NUM_KEYPOINTS)
        image_gaps = rng.uniform(0.002, 0.01, NUM_KEYPOINTS)
        worst = rng.integers(NUM_KEYPOINTS)
        image_errors[worst], image_gaps[worst] = 0.09, (0.005 if failure[i] else 0.2)
        errors.append(image_errors)
        gaps.append(image_gaps)
    write_keypoint_scores(path, errors, gaps if with_gaps else None)
    return failure


def test_calibrate_picks_a_flip_weight_where_the_gaps_separate_and_zero_without_them(tmp_path: Path) -> None:
    scores, check = tmp_path / "scores.parquet", tmp_path / "check.parquet"
    labels = labels_csv(tmp_path / "labels.csv", gap_scores(scores, seed=0))
    check_labels = labels_csv(tmp_path / "check.csv", gap_scores(check, seed=1))
    result = calibrate(scores, labels, out=tmp_path / "th.yaml", metrics=["max_rel_kp_error"],
                       objective="mcc", check_scores=check, check_labels=check_labels)  # fmt: skip
    chosen = result.config.models["A"].max_relative_keypoint_error
    assert chosen is not None and chosen.flip_weight in FLIP_WEIGHTS and chosen.flip_weight > 0
    assert result.mcc == 1.0 and result.check is not None and result.check.mcc == 1.0
    assert load_thresholds(tmp_path / "th.yaml").config.models["A"].max_relative_keypoint_error == chosen
    console = Console(record=True, width=200)
    console.print(result.renderable())
    assert f"x the keypoint's scale (+ {chosen.flip_weight:g} x its flip gap)" in console.export_text()
    # the same errors without the gaps: the relative error alone cannot tell the two kinds apart
    blind = tmp_path / "blind.parquet"
    gap_scores(blind, seed=0, with_gaps=False)
    plain = calibrate(
        blind, labels, out=tmp_path / "plain.yaml", metrics=["max_rel_kp_error"], objective="mcc"
    )
    assert plain.config.models["A"].max_relative_keypoint_error.flip_weight == 0.0
    assert plain.mcc < 0.5
    # thresholds that need the gaps cannot be judged on a check set without them
    no_gaps = tmp_path / "no_gaps.parquet"
    gap_scores(no_gaps, seed=1, with_gaps=False)
    with pytest.raises(ValueError, match=r"A_keypoint_flip_gaps is missing or null"):
        evaluate_thresholds(result.config, no_gaps, check_labels)


def test_choose_flip_weight_prefers_zero_on_a_tie() -> None:
    errors = np.full((4, NUM_KEYPOINTS), 0.02)
    errors[:2, 0] = 0.1  # two failures, separated by the errors alone whatever the weight
    gaps = np.full((4, NUM_KEYPOINTS), 0.01)
    failure = np.array([True, True, False, False])
    assert choose_flip_weight(errors, np.full(NUM_KEYPOINTS, 0.02), gaps, failure) == 0.0
