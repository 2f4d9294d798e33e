"""The bad-input corpus (built under a tmp ``.../bad/``): every item gets a clear error row (per-image
input) or a clear one-line CLI error with exit code 2 before any work (config-level input); never a
traceback, a lost or duplicated row, or code execution.

Tiny UNTRAINED checkpoints (tests/test_score.py helpers): their metrics mean nothing here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_score import LOOSE, Env, make_env
from typer.testing import CliRunner

from prf.body.builtin import build_quadruped
from prf.body.pickle_io import save_smal_pickle
from prf.body.smal import SMAL
from prf.checkpoint import save_export
from prf.cli import app
from prf.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from prf.models.heads import build_regressor_net
from prf.score import score

GOOD_IDS = ["00000000", "00000001", "00000002", "00000003"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tmp_path_factory.mktemp("bad_inputs"), n=4)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (8-bit RGB) and whose pixel data is one empty chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def build_image_corpus(env: Env, bad: Path) -> dict[str, str | None]:
    """An annotated image folder: name -> a phrase its error row must contain (None: must score ok)."""
    bad.mkdir(parents=True)
    source = env.batch / "images" / "00000000.png"
    annotation = json.loads((env.batch / "annotations" / "00000000.json").read_text())
    annotation.pop("mask_path", None)
    rgb = np.asarray(Image.open(source).convert("RGB"))

    def add(name: str, image: bytes | Image.Image, **changes: object) -> None:
        path = bad / name
        if isinstance(image, Image.Image):
            image.save(path)
        else:
            path.write_bytes(image)
        data = {**annotation, **changes}
        for key in [k for k, v in changes.items() if v is DROP]:
            data.pop(key)
        (bad / f"{path.stem}.json").write_text(json.dumps(data))  # NaN is written as a bare NaN token

    DROP = object()
    jpeg = bad.parent / "whole.jpg"
    Image.fromarray(rgb).save(jpeg, quality=90)
    add("good.png", Image.fromarray(rgb))
    add("truncated_jpeg.jpg", jpeg.read_bytes()[: jpeg.stat().st_size // 3])
    add("zero_bytes.png", b"")
    add("text_named.png", b"this is not an image, just text\n")
    add("sixteen_bit.png", Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257))
    add("rgba.png", Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])))
    add("grayscale.png", Image.fromarray(rgb[:, :, 0]))
    add("huge_header.png", png_header_only(20000, 20000))
    kp3d = [list(p) for p in annotation["keypoint_3d"]]
    kp3d[2][1] = float("nan")
    add("nan_keypoint.png", Image.fromarray(rgb), keypoint_3d=kp3d)
    add("short_vector.png", Image.fromarray(rgb), keypoint_3d=annotation["keypoint_3d"][:20])
    add("missing_bbox.png", Image.fromarray(rgb), bbox=DROP)
    add("wrong_type.png", Image.fromarray(rgb), bbox="left half")
    return {
        "good": None,
        "truncated_jpeg": "truncated_jpeg.jpg",
        "zero_bytes": "the file is empty",
        "text_named": "text_named.png",
        "sixteen_bit": None,  # scaled to 8 bits (prf.data.io)
        "rgba": None,
        "grayscale": None,
        "huge_header": "huge_header.png: too large",
        "nan_keypoint": "keypoint_3d",
        "short_vector": "keypoint_3d",
        "missing_bbox": "bbox",
        "wrong_type": "bbox",
    }


def test_every_bad_image_or_annotation_becomes_one_clear_error_row(env: Env, tmp_path: Path) -> None:
    expected = build_image_corpus(env, tmp_path / "bad")
    out = tmp_path / "out" / "scores.parquet"
    summary = score(tmp_path / "bad", env.loose, [env.a, env.b], out, batch_size=4, quiet=True)
    table = pd.read_parquet(out)
    assert sorted(table["image_id"]) == sorted(expected) and table["image_id"].is_unique
    table = table.set_index("image_id")
    for image_id, phrase in expected.items():
        row = table.loc[image_id]
        if phrase is None:
            assert row["status"] == "ok", (image_id, row["reason"])
            assert np.isfinite(row[["A_pa_mpjpe", "B_pck"]].to_numpy(float)).all()
        else:
            assert row["status"] == "error" and not row["keep"], image_id
            assert phrase in row["reason"], (image_id, row["reason"])
            assert "Traceback" not in row["reason"] and "\n" not in row["reason"]
    assert summary.errored == sum(phrase is not None for phrase in expected.values())


def test_an_animal3d_json_with_a_broken_entry_keeps_every_other_row(env: Env, tmp_path: Path) -> None:
    data = json.loads(env.animal3d.read_text())
    del data["data"][1]["keypoint_2d"]  # one entry without its 2D keypoints
    data["data"][2]["img_path"] = "no/such/image.png"
    broken = env.animal3d.parent / "broken.json"
    broken.write_text(json.dumps(data))
    out = tmp_path / "scores.parquet"
    score(broken, env.loose, [env.a, env.b], out, batch_size=4, quiet=True)
    table = pd.read_parquet(out)
    assert len(table) == len(data["data"]) and table["image_id"].is_unique
    assert list(table["status"]) == ["ok", "error", "error", "ok"]
    assert "keypoint_2d" in table["reason"][1] and "no/such/image.png" in table["reason"][2]


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def save_other_layout_checkpoint(path: Path) -> Path:
    """A tiny regressor whose recorded SMAL layout is another model's (other mesh, 36 joints)."""
    body = SMAL.builtin()
    kwargs = {"hidden": 16, "num_part_channels": 4, "feature_channels": 4, "pose_hidden": 4}
    net = build_regressor_net("pare", "regnetx_002", body.num_joints, body.num_betas, out_index=-2, **kwargs)
    layout = {**body.layout_signature(), "name": "another_smal", "num_joints": 36, "sha256": "0" * 64}
    spec = {"arch": "pare", "backbone": "regnetx_002", "num_joints": body.num_joints,
            "num_betas": body.num_betas, "out_index": -2, "head_kwargs": kwargs}  # fmt: skip
    return save_export(
        path, net, net=spec, arch="pare", backbone="regnetx_002", input_size=64, crop_scale=1.25,
        normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, smal_layout=layout,
        stage="synthetic", name="other-layout",
    )  # fmt: skip


def write_builtin_smal(path: Path, scale: float = 1.0) -> Path:
    """The built-in quadruped written as a SMAL model file (its mesh scaled by ``scale``: another layout)."""
    data = build_quadruped()
    save_smal_pickle(dataclasses.replace(data, v_template=data.v_template * scale), path)
    return path


def test_score_with_the_smal_file_the_checkpoints_were_trained_with(env: Env, tmp_path: Path) -> None:
    # the tiny checkpoints were trained with the built-in quadruped; the same model read from a SMAL file
    # (--smal) scores every image as the built-in default does
    smal = write_builtin_smal(tmp_path / "builtin.pkl")
    tables = []
    for name, extra in (("default", []), ("smal", ["--smal", str(smal)])):
        out = tmp_path / name / "scores.parquet"
        args = ["score", str(env.batch), "--thresholds", str(env.loose), "--models", f"{env.a},{env.b}"]
        code, output = invoke([*args, "--out", str(out), "--quiet", "--workers", "0", *extra])
        assert code == 0, output
        tables.append(pd.read_parquet(out).sort_values("image_id").reset_index(drop=True))
    columns = ["image_id", "status", "keep", "A_pa_mpjpe", "A_pck", "B_s_mpjpe"]
    assert (tables[0]["status"] == "ok").all()
    pd.testing.assert_frame_equal(tables[0][columns], tables[1][columns])


class RunsCode:
    """Unpickling this would create the folder ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_config_level_bad_inputs_exit_2_with_one_clear_line_before_any_work(env: Env, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=2))
    other = save_other_layout_checkpoint(tmp_path / "other_layout.pt")
    unknown = tmp_path / "unknown_key.yaml"
    unknown.write_text(LOOSE.replace("pck: {alpha: 0.15, min: 0}", "pck: {alpha: 0.15, min: 0}, pck_mni: 3"))
    yaml_code = tmp_path / "yaml_code.yaml"
    yaml_code.write_text(f"models: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    out = tmp_path / "out" / "scores.parquet"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    base = ["score", str(env.batch), "--out", str(out), "--quiet", "--workers", "0"]
    loose, models = ["--thresholds", str(env.loose)], ["--models", f"{env.a},{env.b}"]
    cases = {
        "thresholds with an unknown key": (
            [*base, "--thresholds", str(unknown), *models],
            ["pck_mni", str(unknown)],
        ),
        "thresholds with a python tag": ([*base, "--thresholds", str(yaml_code), *models], [str(yaml_code)]),
        "checkpoint of another SMAL layout": (
            base + loose + ["--models", f"{other},{env.b}"],
            ["other_layout.pt", "another_smal"],
        ),
        "pickle with a forbidden class": (base + loose + ["--models", f"{evil},{env.b}"], ["evil.pt"]),
        "--processes with --devices": (
            base + loose + models + ["--processes", "2", "--devices", "2"],
            ["--processes", "does not combine with --devices"],
        ),
        "a SMAL file the checkpoints were not trained with": (
            base + loose + models + ["--smal", str(write_builtin_smal(tmp_path / "bigger.pkl", scale=1.1))],
            [str(env.a), "was trained for SMAL layout"],
        ),
        "--out under a file": (
            ["score", str(env.batch), "--out", str(a_file / "scores.parquet"), "--quiet", *loose, *models],
            ["a_file is a file"],
        ),
        "Lightning options with one process": (
            base + loose + models + ["--accelerator", "gpu"],
            ["--accelerator and --strategy choose how Lightning runs several processes"],
        ),
        "--devices 0": (base + loose + models + ["--devices", "0"], ["need --devices >= 1"]),
        "--limit 0": (base + loose + models + ["--limit", "0"], ["--limit must be >= 1, got 0"]),
        "--family-data without --smal": (
            base + loose + models + ["--family-data", str(tmp_path / "family.pkl")],
            ["--family-data", "give --smal too"],
        ),
    }
    for name, (args, phrases) in cases.items():
        code, output = invoke(args)
        assert code == 2, (name, output)
        assert output.startswith("error:") and "Traceback" not in output, (name, output)
        text = " ".join(output.split())
        for phrase in phrases:
            assert phrase in text.replace(" ", "") or phrase in text, (name, phrase, output)
        assert not out.exists() and not out.with_name("scores.parquet.parts").exists(), name
    assert not marker.exists()  # nothing was unpickled or constructed from the files
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
