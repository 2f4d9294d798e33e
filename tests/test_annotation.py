"""Annotation schema: validation errors name the file and the field; helpers give the right shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prf.data.annotation import ANIMAL3D_DEFAULT_FOCAL_PX, Annotation, AnnotationError, split_betas


def make_entry(seed: int = 0, num_joints: int = 35) -> dict:
    """A made-up Animal3D-style entry (JSON types only)."""
    rng = np.random.default_rng(seed)
    return {
        "img_path": f"images/img{seed}.png",
        "mask_path": f"masks/img{seed}.png",
        "bbox": [2.0, 3.0, 20.0, 25.0],
        "width": 32,
        "height": 32,
        "keypoint_2d": np.round(rng.uniform(0, 32, (26, 3)), 3).tolist(),
        "keypoint_3d": np.round(rng.normal(0, 0.3, (26, 3)), 4).tolist(),
        "pose": np.round(rng.normal(0, 0.2, num_joints * 3), 4).tolist(),
        "shape": np.round(rng.normal(0, 1, 20), 4).tolist(),
        "shape_extra": np.round(rng.normal(0, 1, 21), 4).tolist(),
        "trans": [0.0, 0.1, 3.0],
        "category": 3,
        "supercategory": 1,
    }


def write(tmp_path: Path, data: object, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))  # json.dumps writes NaN as the NaN literal, like numpy-made files
    return path


def test_valid_entry_round_trips_and_helpers_have_shapes(tmp_path: Path) -> None:
    entry = make_entry()
    entry["camera"] = {"K": [[500, 0, 16], [0, 500, 16], [0, 0, 1]], "R": np.eye(3).tolist(), "t": [0, 0, 3]}
    entry["viewpoint"] = {"azimuth": 0.5, "elevation": 0.2, "theta": 0.0, "distance": 3.0}
    entry.update(prompt="An image of a dog", seed=7, backend="render", category_name="dog")
    annotation = Annotation.from_dict(entry, num_joints=35, num_betas=41)
    assert annotation.pose_array(35).shape == (35, 3)
    assert annotation.keypoints_2d_array().shape == (26, 3)
    assert annotation.keypoints_3d_array().shape == (26, 3)
    np.testing.assert_allclose(annotation.betas(41), entry["shape"] + entry["shape_extra"])
    np.testing.assert_allclose(annotation.betas(10), entry["shape"][:10])
    assert annotation.betas(41).shape == (41,)
    np.testing.assert_allclose(annotation.intrinsics(), entry["camera"]["K"])
    out = annotation.to_json_dict()
    assert len(out["shape"]) == 20 and len(out["shape_extra"]) == 21
    assert Annotation.from_dict(json.loads(json.dumps(out))) == annotation
    # a file takes pydantic's JSON parser, not json.loads + the dict path: the same annotation
    assert Annotation.from_json_file(write(tmp_path, entry), num_joints=35, num_betas=41) == annotation


def test_missing_shape_extra_means_zero_betas_and_default_focal() -> None:
    entry = make_entry()
    del entry["shape_extra"]
    annotation = Annotation.from_dict(entry)
    betas = annotation.betas(41)
    np.testing.assert_allclose(betas[:20], entry["shape"])
    assert np.all(betas[20:] == 0)
    K = annotation.intrinsics()
    assert K[0, 0] == ANIMAL3D_DEFAULT_FOCAL_PX and K[0, 2] == 15.5  # (W - 1) / 2: pixel centres at integers
    assert annotation.intrinsics(default_focal_px=800.0)[1, 1] == 800.0


def test_numpy_input_is_accepted() -> None:
    entry = make_entry()
    entry["pose"] = np.asarray(entry["pose"]).reshape(35, 3).reshape(-1)
    entry["keypoint_3d"] = np.asarray(entry["keypoint_3d"], dtype=np.float32)
    annotation = Annotation.from_dict(entry)
    assert annotation.pose_array().shape == (35, 3)


def test_wrong_pose_length_names_file_and_field(tmp_path: Path) -> None:
    entry = make_entry(num_joints=33)
    path = write(tmp_path, entry)
    with pytest.raises(AnnotationError) as info:
        Annotation.from_json_file(path, num_joints=35)
    err = info.value
    assert err.path == path and err.field == "pose"
    assert "pose has 99 values, expected 105 for a 35-joint model" in str(err)
    assert str(path) in str(err)
    assert Annotation.from_json_file(path, num_joints=33).num_joints == 33


def test_pose_not_a_multiple_of_three(tmp_path: Path) -> None:
    entry = make_entry()
    entry["pose"] = entry["pose"][:-1]
    with pytest.raises(AnnotationError, match="pose has 104 values") as info:
        Annotation.from_json_file(write(tmp_path, entry))
    assert info.value.field == "pose"


def test_nan_in_keypoints_names_file_and_field(tmp_path: Path) -> None:
    entry = make_entry()
    entry["keypoint_2d"][4][1] = float("nan")
    path = write(tmp_path, entry)
    with pytest.raises(AnnotationError) as info:
        Annotation.from_json_file(path)
    assert info.value.field == "keypoint_2d[4][1]"
    assert info.value.path == path
    assert "NaN or infinite" in str(info.value) and str(path) in str(info.value)


def test_infinity_in_trans_is_refused(tmp_path: Path) -> None:
    entry = make_entry()
    entry["trans"][2] = float("inf")
    with pytest.raises(AnnotationError) as info:
        Annotation.from_json_file(write(tmp_path, entry))
    assert info.value.field == "trans[2]"


def test_missing_field_names_file_and_field(tmp_path: Path) -> None:
    entry = make_entry()
    del entry["keypoint_3d"]
    path = write(tmp_path, entry)
    with pytest.raises(AnnotationError) as info:
        Annotation.from_json_file(path)
    assert info.value.field == "keypoint_3d" and info.value.path == path
    assert "required field is missing" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "reported"),
    [
        ("width", "abc", "width"),
        ("category", True, "category"),
        ("pose", "not a list", "pose"),
        ("bbox", {"x": 1}, "bbox"),
        ("img_path", 5, "img_path"),
        ("shape", [0.0] * 19 + ["1.5"], "shape[19]"),
    ],
)
def test_wrong_type_names_file_and_field(tmp_path: Path, field: str, value: object, reported: str) -> None:
    entry = make_entry()
    entry[field] = value
    path = write(tmp_path, entry)
    with pytest.raises(AnnotationError) as info:
        Annotation.from_json_file(path)
    assert info.value.field == reported and info.value.path == path
    assert f"field '{reported}'" in str(info.value)


def test_wrong_lengths_have_helpful_messages() -> None:
    entry = make_entry()
    entry["shape"] = entry["shape"] + entry["shape_extra"]
    with pytest.raises(AnnotationError, match=r"shape has 41 values, expected 20.*shape_extra"):
        Annotation.from_dict(entry)
    entry = make_entry()
    entry["keypoint_2d"] = entry["keypoint_2d"][:25]
    with pytest.raises(AnnotationError, match="keypoint_2d has 25 rows, expected 26"):
        Annotation.from_dict(entry)
    entry = make_entry()
    entry["bbox"] = [1, 2, 3]
    with pytest.raises(AnnotationError, match="bbox has 3 values, expected 4"):
        Annotation.from_dict(entry)


def test_camera_rotation_is_checked() -> None:
    entry = make_entry()
    entry["camera"] = {"K": np.eye(3).tolist(), "R": np.ones((3, 3)).tolist(), "t": [0, 0, 1]}
    with pytest.raises(AnnotationError, match="not a rotation matrix") as info:
        Annotation.from_dict(entry)
    assert info.value.field == "camera"


def test_extra_unknown_keys_are_kept_and_written_back() -> None:
    entry = make_entry()
    entry["my_extra"] = {"note": [1, 2]}
    entry["reproj_kp_2d"] = np.zeros((26, 2)).tolist()
    annotation = Annotation.from_dict(entry)
    assert annotation.extras == {"my_extra": {"note": [1, 2]}}
    assert annotation.to_json_dict()["my_extra"] == {"note": [1, 2]}


def test_not_json_and_not_an_object(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON") as info:
        Annotation.from_json_file(bad)
    assert info.value.path == bad
    with pytest.raises(AnnotationError, match="expected a JSON object"):
        Annotation.from_json_file(write(tmp_path, [1, 2], "list.json"))
    with pytest.raises(AnnotationError, match="not found"):
        Annotation.from_json_file(tmp_path / "missing.json")


def test_split_betas_pads_and_refuses_too_many() -> None:
    shape, extra = split_betas(np.arange(25, dtype=float))
    assert len(shape) == 20 and len(extra) == 21
    assert extra[:5] == [20.0, 21.0, 22.0, 23.0, 24.0] and extra[5:] == [0.0] * 16
    with pytest.raises(ValueError, match="at most 41"):
        split_betas(np.zeros(42))
    with pytest.raises(ValueError, match=r"num_betas must be in 1\.\.41"):
        Annotation.from_dict(make_entry()).validate_for(num_betas=50)


@pytest.mark.parametrize(
    ("area", "message"),
    [(-1.0, "must be >= 0"), (32 * 32 + 1, "more than the whole 32 x 32 image"), ("9", "")],
)
def test_mask_area_must_fit_the_image(tmp_path: Path, area: object, message: str) -> None:
    data = {**make_entry(), "mask_area": area}
    with pytest.raises(AnnotationError) as info:
        Annotation.from_json_file(write(tmp_path, data))
    assert info.value.field == "mask_area" and message in str(info.value)
    assert Annotation.from_dict({**make_entry(), "mask_area": 32 * 32}).mask_area == 1024  # the whole image
    assert "mask_area" not in Annotation.from_dict(make_entry()).to_json_dict()  # optional, left out unset
