"""Tests for thresholds.yaml: schema, error messages naming file and key, checks, writing, shipped files."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from prf.thresholds import (
    Check,
    ThresholdsError,
    dump_thresholds,
    load_thresholds,
    parse_thresholds,
)

REPO = Path(__file__).resolve().parent.parent
GOOD = """
combine: all
models:
  A:
    pa_mpjpe_max: 108.06
    s_mpjpe_max: 499.99
    pck: {alpha: 0.15, normalization: mask_area, min: 95.83}
  B:
    checkpoint: ckpt/b.pt
    pa_mpjpe_max: null
    s_mpjpe_max: 400
    pck: null
    max_keypoint_error_max: 0.4
"""


def test_good_file_loads_with_hash_and_checkpoint_relative_to_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(GOOD)
    loaded = load_thresholds(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.config.model_names() == ["A", "B"]
    assert loaded.config.combine == "all"
    a, b = loaded.config.models["A"], loaded.config.models["B"]
    assert [(c.metric, c.op, c.limit) for c in a.checks()] == [
        ("pa_mpjpe", "<=", 108.06),
        ("s_mpjpe", "<=", 499.99),
        ("pck", ">=", 95.83),
    ]
    assert [(c.metric, c.limit) for c in b.checks()] == [("s_mpjpe", 400.0), ("max_kp_error", 0.4)]
    assert (
        b.pck_settings.alpha == 0.15 and b.pck_settings.normalization == "mask_area"
    )  # defaults for the column
    assert loaded.checkpoint_path("B") == tmp_path / "ckpt" / "b.pt"
    assert loaded.checkpoint_path("A") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("s_mpjpe_max: 400", "s_mpjpe_max: 400\n    bogus: 1"),
            r"models\.B\.bogus: unknown key",
        ),
        (GOOD.replace("combine: all", "combine: all\ncombin: any"), r"combin: unknown key"),
        (GOOD.replace("min: 95.83", "min: high"), r"models\.A\.pck\.min: Input should be a valid number"),
        (GOOD.replace("s_mpjpe_max: 400", 's_mpjpe_max: "400"'), r"models\.B\.s_mpjpe_max: Input should be"),
        (GOOD.replace("normalization: mask_area", "normalization: box"), r"models\.A\.pck\.normalization"),
        (GOOD.replace("min: 95.83", "min: 0.9583"), r"models\.A\.pck\.min: 0\.9583 looks like a share"),
        (
            GOOD.replace("pa_mpjpe_max: 108.06", "pa_mpjpe_max: -1"),
            r"models\.A\.pa_mpjpe_max: .*greater than 0",
        ),
        (GOOD.replace("combine: all", "combine: both"), r"combine: Input should be 'all' or 'any'"),
        (GOOD.replace("    s_mpjpe_max: 499.99\n", ""), r"models\.A\.s_mpjpe_max: required key is missing"),
        ("combine: all\n", r"models: required key is missing"),
        ("models: {}\n", r"models: needs at least one model"),
        ("models:\n  A_1: {pa_mpjpe_max: 1, s_mpjpe_max: null, pck: null}\n", r"model name 'A_1'"),
        (
            "models:\n  A: {pa_mpjpe_max: null, s_mpjpe_max: null, pck: null}\n",
            r"models\.A: sets no threshold",
        ),
        ("models: [A, B]\n", r"models: Input should be a valid dictionary"),
        ("- 1\n", r"expected a mapping"),
        ("models: {A: {pa_mpjpe_max: 1\n", r"not valid YAML at line"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ThresholdsError, match=expected) as info:
        load_thresholds(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"thresholds-paper\.yaml"):
        load_thresholds(tmp_path / "nope.yaml")


def test_checks_pass_and_describe_failures() -> None:
    low = Check("pa_mpjpe", "<=", 108.06)
    high = Check("pck", ">=", 95.83)
    assert low.passes(108.06) and not low.passes(108.07)
    assert high.passes(95.83) and not high.passes(95.0)
    assert not low.passes(math.nan) and not high.passes(math.nan)  # undefined never passes
    assert low.describe_failure(612.04) == "pa_mpjpe 612.0 > 108.06"
    assert high.describe_failure(83.333) == "pck 83.3 < 95.83"
    assert Check("max_kp_error", "<=", 0.4).describe_failure(0.4567) == "max_kp_error 0.457 > 0.4"
    assert high.describe_failure(math.nan) == "pck undefined"


def test_dump_roundtrips_and_keeps_comments() -> None:
    config = parse_thresholds(GOOD).config
    text = dump_thresholds(config, "line one\nline two")
    assert text.startswith("# line one\n# line two\n")
    assert parse_thresholds(text).config == config


def test_shipped_files_load_and_hold_the_papers_values() -> None:
    paper = load_thresholds(REPO / "examples" / "thresholds-paper.yaml").config
    default = load_thresholds(REPO / "thresholds.yaml")
    assert paper.combine == "all" and paper.model_names() == ["A", "B"]
    for model in paper.models.values():
        assert (model.pa_mpjpe_max, model.s_mpjpe_max, model.pck.min) == (108.06, 499.99, 95.83)
    assert default.config.model_names() == ["A", "B"]
    assert default.checkpoint_path("A") == REPO / "checkpoints" / "prf_model_a.pt"
    assert default.checkpoint_path("B") == REPO / "checkpoints" / "prf_model_b.pt"
    assert "prf calibrate" in default.text  # says how it gets tuned
