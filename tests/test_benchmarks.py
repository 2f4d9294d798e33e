"""Tests for the benchmark machinery: filter-quality statistics on hand-made tables, the interval helper,
the writers, the filter wiring of the two benchmarks, and the downstream segmenter (IoU on a hand-made
prediction, a few training steps). The end-to-end --quick runs are not here (they take about a minute)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, downstream_seg, seg_model  # noqa: E402
from benchmarks.common import FilterRun  # noqa: E402
from benchmarks.downstream_seg import SegSettings, aggregate, seed_result, verdicts  # noqa: E402
from benchmarks.filter_quality import FilterSetup, build_runs, check_targets  # noqa: E402


def labels_table() -> pd.DataFrame:
    """4 faithful images, 2 leg swaps (effects 0.05 and 0.3), 2 head turns (0.4, 0.5)."""
    return pd.DataFrame(
        {
            "image_id": [f"{i:02d}" for i in range(8)],
            "injected_failure": ["none"] * 4 + ["leg_swap", "leg_swap", "head_turn", "head_turn"],
            "failure_severity": [0.0] * 4 + [0.5] * 4,
            "failure_effect": [0.0] * 4 + [0.05, 0.3, 0.4, 0.5],
        }
    )


# Rejects faithful 00, keeps the small leg swap 04, rejects 05, 06, 07.
KEEP = pd.Series([False, True, True, True, True, False, False, False], index=[f"{i:02d}" for i in range(8)])


def test_binary_stats_known_precision_recall_f1() -> None:
    failed = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    rejected = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    s = common.binary_stats(failed, rejected)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (3, 1, 2, 4)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert s["kept_fraction"] == pytest.approx(0.6)
    assert s["kept_failure_share"] == pytest.approx(2 / 6)


def test_binary_stats_degenerate_cases() -> None:
    keep_all = common.binary_stats(np.array([True, False]), np.array([False, False]))
    assert math.isnan(keep_all["precision"]) and keep_all["recall"] == 0.0 and keep_all["f1"] == 0.0
    no_failures = common.binary_stats(np.array([False, False]), np.array([True, False]))
    assert math.isnan(no_failures["recall"]) and math.isnan(no_failures["f1"])
    assert no_failures["precision"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        common.binary_stats(np.array([True]), np.array([True, False]))


def test_auroc_known_value_direction_and_nan() -> None:
    failed = np.array([False, False, True, True])
    values = np.array([0.1, 0.4, 0.35, 0.8])  # 3 of the 4 (failed, faithful) pairs ordered right
    assert common.auroc(failed, values) == pytest.approx(0.75)
    assert common.auroc(failed, -values, higher_is_worse=False) == pytest.approx(0.75)
    # an unscorable (NaN) failed image ranks as the most suspicious: now every pair is ordered right
    assert common.auroc(failed, np.array([0.1, 0.4, np.nan, 0.8])) == pytest.approx(1.0)
    assert math.isnan(common.auroc(np.array([True, True]), np.array([0.1, 0.2])))


def test_evaluate_filters_per_type_and_effect_size() -> None:
    labels = labels_table()
    rows = common.evaluate_filters(labels, [FilterRun("f", KEEP, seconds=4.0)], None).set_index("subset")
    assert rows.loc["all", ["tp", "fp", "fn", "tn"]].tolist() == [3, 1, 1, 3]
    assert rows.loc["all", "precision"] == pytest.approx(0.75) and rows.loc["all", "recall"] == pytest.approx(
        0.75
    )
    assert rows.loc["all", "kept_fraction"] == pytest.approx(0.5)
    assert rows.loc["all", "seconds_per_image"] == pytest.approx(0.5)
    assert rows.loc["leg_swap", ["tp", "fp", "fn", "tn"]].tolist() == [1, 1, 1, 3]  # vs all faithful images
    assert rows.loc["head_turn", "precision"] == pytest.approx(2 / 3)

    big = common.evaluate_filters(labels, [FilterRun("f", KEEP)], 0.15).set_index("subset")
    assert big.loc["all", ["tp", "fp", "fn", "tn"]].tolist() == [3, 1, 0, 3]  # the 0.05 swap is left out
    assert big.loc["all", "n_excluded"] == 1 and big.loc["head_turn", "n_excluded"] == 0
    assert big.loc["all", "f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert big.loc["leg_swap", "recall"] == pytest.approx(1.0)


def test_articulation_subset_pools_its_types_against_all_faithful_images() -> None:
    flip = pd.DataFrame({"image_id": ["08", "09"], "injected_failure": ["orientation_flip"] * 2,
                         "failure_severity": [1.0, 1.0], "failure_effect": [0.9, 0.1]})  # fmt: skip
    labels = pd.concat([labels_table(), flip], ignore_index=True)
    keep = pd.concat([KEEP, pd.Series([True, False], index=["08", "09"])])  # misses 08, rejects tiny 09
    big = common.evaluate_filters(labels, [FilterRun("f", keep)], 0.15).set_index("subset")
    # swaps and head turns (the 0.05 swap left out) against the 4 faithful images; no flip counts here
    assert big.loc["articulation", ["tp", "fp", "fn", "tn"]].tolist() == [3, 1, 0, 3]
    assert big.loc["articulation", "n_excluded"] == 1
    assert big.loc["all", ["tp", "fp", "fn", "tn"]].tolist() == [3, 1, 1, 3]
    assert big.loc["all", "n_excluded"] == 2 and big.loc["orientation_flip", "n_excluded"] == 1
    # without articulation failures there is no pooled subset; a flip-only batch has its type alone
    only_flips = labels[labels["injected_failure"].isin(["none", "orientation_flip"])]
    assert set(common.subset_masks(only_flips)) == {"all", "orientation_flip"}
    assert common.subset_members("articulation") == common.ARTICULATION
    assert common.subset_members("leg_swap") == ("leg_swap",)


def test_evaluate_scores_and_missing_images() -> None:
    labels = labels_table()
    pck = pd.Series([100, 90, 100, 96, 100, 50, 40, 60], index=KEEP.index, dtype=float)
    rows = common.evaluate_scores(labels, [FilterRun("prf_A", KEEP, {"A_pck": pck})], None)
    by = rows.set_index("subset")["auroc"]
    # head turns (40, 60) are below every faithful value (90-100): perfect; leg swaps 100 and 50:
    # 100 ties two faithful 100s and beats 90, 96 -> (0.5 + 0.5 + 0 + 0 + 4) / 8
    assert by["head_turn"] == pytest.approx(1.0)
    assert by["leg_swap"] == pytest.approx((4 + 0.5 * 2) / 8)
    with pytest.raises(ValueError, match="not in the SCORES table"):
        common.evaluate_filters(labels, [FilterRun("f", KEEP.iloc[:5])])
    with pytest.raises(ValueError, match="no known direction"):
        common.evaluate_scores(labels, [FilterRun("f", KEEP, {"mask_area": pck})])


def test_keep_verdicts_intersection_errors_and_directions() -> None:
    scores = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "status": ["ok", "ok", "ok", "error"],
            "A_keep": [True, True, False, None],
            "B_keep": [True, False, True, None],
        }
    )
    both = common.keep_verdicts(scores, ("A_keep", "B_keep"))
    assert both.to_dict() == {"a": True, "b": False, "c": False, "d": False}
    assert common.keep_verdicts(scores, ("A_keep",)).to_dict() == {
        "a": True,
        "b": True,
        "c": False,
        "d": False,
    }
    with pytest.raises(ValueError, match="no column"):
        common.keep_verdicts(scores, ("C_keep",))
    assert common.direction_of("A_pck") is False
    assert common.direction_of("B_max_kp_error") is True and common.direction_of("kcf_ce_theta") is True
    assert common.direction_of("kcf_fold") is None and common.direction_of("mask_area") is None


def test_mean_interval_t_and_bootstrap() -> None:
    t = common.mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3.0)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert (t.mean, t.low, t.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    boot = common.mean_interval([1.0, 2.0, 3.0, 4.0], method="bootstrap", seed=0)
    assert 1.0 <= boot.low < 2.5 < boot.high <= 4.0
    assert boot == common.mean_interval([1.0, 2.0, 3.0, 4.0], method="bootstrap", seed=0)
    single = common.mean_interval([5.0])
    assert single.mean == 5.0 and math.isnan(single.low) and single.text() == "5.00 [n/a]"
    with pytest.raises(ValueError, match="finite"):
        common.mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="unknown interval method"):
        common.mean_interval([1.0, 2.0], method="exact")


def test_writers(tmp_path: Path) -> None:
    table = common.markdown_table(
        [{"a": "x", "b": 0.5}, {"a": "y", "b": float("nan")}], [("a", "A"), ("b", "B")]
    )
    assert table == "| A | B |\n|---|---|\n| x | 0.500 |\n| y | - |\n"
    frame = pd.DataFrame({"v": [1.0, float("nan")]})
    path = common.write_json(tmp_path / "r.json", {"rows": frame, "x": np.float64(2.5), "p": Path("a/b")})
    assert json.loads(path.read_text()) == {"rows": [{"v": 1.0}, {"v": None}], "x": 2.5, "p": "a/b"}


def test_build_runs_and_targets_from_scores_tables() -> None:
    labels = labels_table()
    ids = labels["image_id"].tolist()
    prf = pd.DataFrame({"image_id": ids, "status": ["ok"] * 8, "keep": KEEP.to_numpy(),
                        "A_keep": KEEP.to_numpy(), "B_keep": [True] * 7 + [False],
                        "A_pck": np.linspace(100, 30, 8), "B_pck": np.linspace(100, 30, 8)})  # fmt: skip
    kcf = pd.DataFrame(
        {"image_id": ids, "status": ["ok"] * 8, "kcf_keep": [True] * 8, "kcf_ce": np.arange(8.0)}
    )
    runs = build_runs(labels, prf, 2.0, kcf, 400.0)
    assert [r.name for r in runs] == ["none", "kcf", "prf_A", "prf_B", "prf_A&B", "oracle"]
    by = {r.name: r for r in runs}
    assert by["prf_A&B"].keep.tolist() == (KEEP & pd.Series([True] * 7 + [False], index=KEEP.index)).tolist()
    assert set(by["prf_A"].scores) == {"A_pck"} and set(by["kcf"].scores) == {"kcf_ce"}
    assert by["oracle"].keep.tolist() == [True] * 4 + [False] * 4
    targets = {t["check"]: t for t in check_targets(common.evaluate_filters(labels, runs, 0.15), runs)}
    head = targets["prf_A&B F1 on head_turn >= 0.85"]
    assert head["value"] == pytest.approx(0.8) and head["pass"] is False  # P 2/3, R 1
    assert targets["prf_A&B F1 on leg_length >= 0.85"]["pass"] is None  # no such failures
    pooled = targets["prf_A&B F1 on articulation >= 0.85"]  # swaps and head turns: P 3/4, R 1
    assert pooled["value"] == pytest.approx(6 / 7) and pooled["pass"] is True
    assert targets["prf_A&B F1 - kcf F1 on articulation >= 0.3"]["value"] == pytest.approx(6 / 7)
    assert targets["kcf seconds / prf seconds (same batch) >= 100"]["value"] == pytest.approx(200.0)
    keep = verdicts(labels, prf, kcf)
    assert keep["prf"].tolist() == by["prf_A&B"].keep.tolist() and keep["kcf"].all()


def test_downstream_aggregate_differences_and_targets() -> None:
    def seed(values: dict[str, float]) -> dict:
        iou = dict.fromkeys(seg_model.COARSE_PARTS, 50.0)
        return {"filters": {k: {"miou": v, "miou_parts": v, "iou": iou, "kept": 10, "kept_failures": 1}
                            for k, v in values.items()}}  # fmt: skip

    per_seed = [seed({"unfiltered": 50, "kcf": 52, "prf": 56, "oracle": 57}),
                seed({"unfiltered": 52, "kcf": 54, "prf": 56, "oracle": 59})]  # fmt: skip
    result = aggregate(per_seed)
    assert result["filters"]["prf"]["miou"]["mean"] == pytest.approx(56.0)
    assert result["differences"]["prf - unfiltered"]["mean"] == pytest.approx(5.0)
    assert [t["pass"] for t in result["targets"]] == [True, True, True]
    assert result["targets"][2]["value"] == pytest.approx(2.0)  # oracle - prf


def test_coarse_labels_confusion_and_iou_on_hand_made_prediction() -> None:
    fine = np.array([[0, 1, 2, 3], [4, 7, 8, 10]], dtype=np.uint8)  # bg head neck torso / legs tail ear
    assert seg_model.coarse_labels(fine).tolist() == [[0, 1, 2, 2], [3, 3, 4, 1]]
    with pytest.raises(ValueError, match="fine labels"):
        seg_model.coarse_labels(np.array([[11]], dtype=np.uint8))
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = seg_model.confusion_matrix(pred, target)
    assert confusion[0].tolist() == [1, 1, 0, 0, 0] and int(confusion.sum()) == 6
    iou = seg_model.iou_from_confusion(confusion)
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3]) and math.isnan(iou[4])  # absent from prediction and target


class OracleNet(torch.nn.Module):
    """Returns one-hot logits of fixed labels (N, H, W), as SegFormer's output object does."""

    def __init__(self, labels: torch.Tensor) -> None:
        super().__init__()
        self.labels = labels

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        n = pixel_values.shape[0]
        onehot = torch.nn.functional.one_hot(self.labels[:n].long(), seg_model.NUM_CLASSES)
        return SimpleNamespace(logits=onehot.permute(0, 3, 1, 2).float())


def test_evaluate_segmenter_perfect_and_partial() -> None:
    labels = torch.zeros(2, 8, 8, dtype=torch.uint8)
    labels[:, 2:6, 2:6] = 2
    labels[:, 6:, :] = 3
    data = seg_model.SegData(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), labels, ["a", "b"])
    perfect = seg_model.evaluate_segmenter(OracleNet(labels), data)
    assert perfect["iou"]["torso"] == pytest.approx(100.0) and perfect["miou"] == pytest.approx(100.0)
    assert math.isnan(perfect["iou"]["head"])  # not present: left out of the mean
    wrong = labels.clone()
    wrong[:, 6:, :4] = 0  # half the leg pixels predicted as background
    partial = seg_model.evaluate_segmenter(OracleNet(wrong), data)
    assert partial["iou"]["leg"] == pytest.approx(50.0)
    assert partial["iou"]["background"] == pytest.approx(100.0 * 32 / 40)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning threads make this test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_segformer_trains_a_few_steps(one_thread: None) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(4, 32, 32, dtype=torch.uint8)
    labels[:, 8:24, 8:24] = 2
    images[:, :, 8:24, 8:24] = 200  # a bright square = torso
    data = seg_model.SegData(images, labels, list("abcd"))
    model = seg_model.build_segformer(None, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    log = seg_model.train_segmenter(model, data, iterations=12, batch_size=4, lr=3e-3, seed=0)
    assert log.iterations == 12 and len(log.losses) == 12 and all(math.isfinite(v) for v in log.losses)
    assert np.mean(log.losses[-3:]) < np.mean(log.losses[:3])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    scores = seg_model.evaluate_segmenter(model, data)
    assert 0.0 <= scores["miou"] <= 100.0 and scores["pixels"] == 4 * 32 * 32
    with pytest.raises(ValueError, match="kept nothing"):
        seg_model.train_segmenter(model, data.subset(np.zeros(4, dtype=bool)), iterations=1)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        seg_model.build_segformer(Path("/nonexistent/mit-b5"))


def test_downstream_seed_results_are_reused_only_for_the_same_run(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_run_seed(seed, settings, setup, work, pretrained):
        calls.append(seed)
        # an arm that kept no image has a NaN loss: it must survive the round trip (as null)
        return {"seed": seed, "filters": {"kcf": {"miou": 50.0 + len(calls), "final_loss": math.nan}}}

    monkeypatch.setattr(downstream_seg, "run_seed", fake_run_seed)
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("combine: all\n")
    setup = FilterSetup(models=[], thresholds=thresholds)
    first = seed_result(0, SegSettings(), setup, tmp_path / "seed0", None)
    again = seed_result(0, SegSettings(), setup, tmp_path / "seed0", None)
    assert calls == [0] and again["filters"]["kcf"] == {"miou": 51.0, "final_loss": None}
    assert first["filters"]["kcf"]["miou"] == 51.0
    seed_result(0, SegSettings(iterations=7), setup, tmp_path / "seed0", None)  # other settings: rerun
    thresholds.write_text("combine: any\n")  # other thresholds bytes: rerun
    seed_result(0, SegSettings(iterations=7), setup, tmp_path / "seed0", None)
    assert calls == [0, 0, 0]
    monkeypatch.setattr("platform.platform", lambda: "another-machine")  # another machine: rerun
    seed_result(0, SegSettings(iterations=7), setup, tmp_path / "seed0", None)
    assert calls == [0, 0, 0, 0]
