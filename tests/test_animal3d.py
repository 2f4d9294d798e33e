"""Animal3D JSON: per-entry errors, round trip, and the lazy sample iterators over non-BATCH inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prf.data.animal3d import (
    iter_animal3d_samples,
    iter_image_folder_samples,
    read_animal3d_json,
    resolve_image_path,
    write_animal3d_json,
)
from prf.data.annotation import Annotation, AnnotationError


def make_entry(seed: int, num_joints: int = 35) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "img_path": f"images/n0210_{seed}.JPEG",
        "mask_path": f"masks/n0210_{seed}.png",
        "bbox": [1.0, 2.0, 30.0, 20.0],
        "width": 40,
        "height": 30,
        "keypoint_2d": np.round(rng.uniform(0, 30, (26, 3)), 3).tolist(),
        "reproj_kp_2d": np.round(rng.uniform(0, 30, (26, 2)), 3).tolist(),
        "keypoint_3d": np.round(rng.normal(0, 0.3, (26, 3)), 4).tolist(),
        "pose": np.round(rng.normal(0, 0.2, num_joints * 3), 4).tolist(),
        "shape": np.round(rng.normal(0, 1, 20), 4).tolist(),
        "shape_extra": np.round(rng.normal(0, 1, 21), 4).tolist(),
        "trans": [0.0, 0.0, 4.0],
        "category": seed % 40,
        "supercategory": seed % 5,
    }


def test_broken_entry_is_reported_and_the_others_load(tmp_path: Path) -> None:
    entries = [make_entry(i) for i in range(4)]
    entries[2]["keypoint_2d"] = entries[2]["keypoint_2d"][:20]
    entries[3]["trans"] = "up"
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"info": {"year": 2023}, "data": entries, "categories": [{"id": 0}]}))
    result = read_animal3d_json(path, num_joints=35)
    assert [e.index for e in result.entries] == [0, 1]
    assert len(result) == 2
    assert [(err.index, err.field) for err in result.errors] == [(2, "keypoint_2d"), (3, "trans")]
    assert all(err.path == path for err in result.errors)
    assert "entry 2" in str(result.errors[0]) and "keypoint_2d has 20 rows" in str(result.errors[0])
    assert result.extra == {"info": {"year": 2023}, "categories": [{"id": 0}]}


def test_joint_count_check_is_per_entry(tmp_path: Path) -> None:
    entries = [make_entry(0), make_entry(1, num_joints=33)]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"data": entries}))
    result = read_animal3d_json(path, num_joints=35)
    assert [e.index for e in result.entries] == [0]
    assert result.errors[0].index == 1 and result.errors[0].field == "pose"
    assert "expected 105 for a 35-joint model" in str(result.errors[0])


def test_write_read_round_trip(tmp_path: Path) -> None:
    annotations = [Annotation.from_dict(make_entry(i)) for i in range(3)]
    annotations[1] = annotations[1].model_copy(update={"shape_extra": None})
    path = write_animal3d_json(tmp_path / "real.json", annotations, extra={"info": "stand-in"})
    raw = json.loads(path.read_text())
    assert set(raw) == {"data", "info"}
    assert "shape_extra" not in raw["data"][1] and len(raw["data"][0]["shape_extra"]) == 21
    result = read_animal3d_json(path)
    assert result.errors == []
    assert result.annotations == annotations
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_write_validates_dicts(tmp_path: Path) -> None:
    bad = make_entry(0)
    bad["bbox"] = [1, 2]
    with pytest.raises(AnnotationError) as info:
        write_animal3d_json(tmp_path / "x.json", [make_entry(1), bad])
    assert info.value.index == 1 and info.value.field == "bbox"
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{broken", "not valid JSON"),
        (json.dumps({"images": []}), "expected an object with a 'data' list"),
        (json.dumps({"data": {"a": 1}}), "'data' must be a list"),
        (json.dumps(3), "expected an object with a 'data' list"),
    ],
)
def test_whole_file_problems_raise(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as info:
        read_animal3d_json(path)
    assert info.value.path == path


def test_bare_list_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bare.json"
    path.write_text(json.dumps([make_entry(0)]))
    assert len(read_animal3d_json(path)) == 1


def test_image_paths_resolve_against_json_folder_or_image_root(tmp_path: Path) -> None:
    json_path = tmp_path / "ann" / "test.json"
    assert resolve_image_path(json_path, "images/a.jpg") == tmp_path / "ann" / "images" / "a.jpg"
    assert (
        resolve_image_path(json_path, "images/a.jpg", tmp_path / "root") == tmp_path / "root" / "images/a.jpg"
    )
    assert resolve_image_path(json_path, "/abs/a.jpg", tmp_path) == Path("/abs/a.jpg")


def test_iter_animal3d_samples_is_lazy_and_unique(tmp_path: Path) -> None:
    entries = [make_entry(0), make_entry(1), make_entry(2), {"no": "img_path"}]
    entries[2]["img_path"] = "other/n0210_0.JPEG"  # same stem as entry 0
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"data": entries}))
    refs = list(iter_animal3d_samples(path, image_root=tmp_path / "imgs"))
    assert [r.image_id for r in refs] == ["n0210_0", "n0210_1", "n0210_0-2", "entry-3"]
    assert refs[1].image_path == tmp_path / "imgs" / "images" / "n0210_1.JPEG"
    assert refs[0].annotation_path is None and refs[0].source == "animal3d_json"
    assert refs[1].load_annotation(num_joints=35).category == 1
    with pytest.raises(AnnotationError) as info:
        refs[3].load_annotation()
    assert info.value.index == 3 and info.value.path == path
    with pytest.raises(AnnotationError, match="img_path"):
        refs[3].read_image()


def test_iter_image_folder_samples_reports_a_missing_annotation(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.png").write_bytes(b"")
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(make_entry(0)))
    refs = list(iter_image_folder_samples(tmp_path))
    assert [(r.image_id, r.source_index) for r in refs] == [("a", 0), ("b", 1), ("c", 2)]
    assert refs[0].load_annotation().width == 40
    with pytest.raises(AnnotationError, match="not found") as info:
        refs[2].load_annotation()
    assert info.value.path == tmp_path / "c.json"
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"would share a\.json"):
        list(iter_image_folder_samples(tmp_path))
