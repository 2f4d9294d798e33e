"""SMAL-format pickle loading: Python-2 / chumpy / scipy.sparse files, real fixtures, refusals, round trip."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
from smal_pickles import (
    FakeCh,
    FakeChExpression,
    make_model_data,
    py2_dumps,
    smal_file_dict,
    write_smal_pickle,
)

from prf.body import layout
from prf.body.model_data import SMALModelData
from prf.body.pickle_io import (
    ForbiddenPickleClass,
    SMALFileError,
    SMALFileNotFoundError,
    load_pickle_restricted,
    load_smal_model_data,
    save_smal_pickle,
)
from prf.body.smal import SMAL

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "smal"
ARRAY_FIELDS = ("v_template", "shapedirs", "posedirs", "j_regressor", "weights", "parents", "faces")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"real SMAL fixture {path} is not available (it lives outside the repository)")
    return path


def _assert_same_model(a: SMALModelData, b: SMALModelData) -> None:
    for key in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert a.joint_names == b.joint_names
    assert a.keypoint_groups == b.keypoint_groups


@pytest.mark.parametrize("protocol", [0, 2])
@pytest.mark.parametrize("num_joints", [33, 35])
@pytest.mark.parametrize("old_sparse", [False, True])
def test_python2_chumpy_pickle_loads_exactly(
    tmp_path: Path, protocol: int, num_joints: int, old_sparse: bool
):
    data = make_model_data(num_joints=num_joints, num_betas=7, num_verts=40)
    path = write_smal_pickle(tmp_path / "model.pkl", data, protocol, old_sparse=old_sparse)
    assert b"chumpy.ch\nCh" in path.read_bytes() and b"scipy.sparse.csc\ncsc_matrix" in path.read_bytes()

    raw = load_pickle_restricted(path)
    assert isinstance(raw["shapedirs"], np.ndarray) and raw["shapedirs"].shape == (40, 3, 7)
    assert scipy.sparse.issparse(raw["J_regressor"]) and raw["J_regressor"].format == "csc"
    assert raw["kintree_table"][0, 0] == 4294967295
    assert raw["bs_style"] == "lbs"

    loaded = load_smal_model_data(path)
    _assert_same_model(loaded, data)
    assert loaded.parents[0] == -1 and loaded.parents.dtype == np.int64
    assert loaded.joint_names == list(layout.JOINT_NAMES_35[:num_joints])
    assert loaded.num_betas == 7 and loaded.name == "model"
    assert loaded.part_labels is None and loaded.family_means is None

    out = SMAL(loaded)(betas=torch.randn(2, 7), pose=0.2 * torch.randn(2, num_joints, 3))
    assert out.vertices.shape == (2, 40, 3) and out.keypoints.shape == (2, 26, 3)
    assert torch.isfinite(out.vertices).all()


def test_generic_joint_count_and_real_mesh_keypoints(tmp_path: Path):
    data = make_model_data(
        num_joints=4, num_betas=2, num_verts=layout.SMAL_NUM_VERTICES, with_keypoints=False
    )
    loaded = load_smal_model_data(write_smal_pickle(tmp_path / "m.pkl", data, 2))
    assert loaded.joint_names == ["joint0", "joint1", "joint2", "joint3"]
    assert loaded.keypoint_groups == [list(g) for g in layout.SMAL_KEYPOINT_VERTEX_GROUPS]

    small = make_model_data(num_joints=4, num_betas=2, num_verts=30, with_keypoints=False)
    assert load_smal_model_data(write_smal_pickle(tmp_path / "s.pkl", small, 2)).keypoint_groups is None


def test_real_walking_prior_loads_with_chumpy_as_array():
    prior = load_pickle_restricted(_fixture("walking_prior.pkl"))
    assert set(prior) == {"pic", "mean_pose", "cov"}
    assert isinstance(prior["pic"], np.ndarray) and prior["pic"].shape == (105, 105)
    assert prior["mean_pose"].shape == (105,) and prior["cov"].shape == (105, 105)
    assert np.isfinite(prior["pic"]).all()
    np.testing.assert_allclose(prior["cov"], prior["cov"].T, atol=1e-8)


def test_real_family_file_gives_family_means_and_default_betas(tmp_path: Path):
    family_file = _fixture("my_smpl_data_00781_4_all.pkl")
    cluster_means = load_pickle_restricted(family_file)["cluster_means"]
    model_path = write_smal_pickle(tmp_path / "m35.pkl", make_model_data(35, 41, 40), 0)

    data = load_smal_model_data(model_path, family_data=family_file)
    assert data.family_means.shape == (5, 41)
    np.testing.assert_array_equal(data.family_means, cluster_means)

    model = SMAL.from_file(model_path, family_data=family_file, family=1, dtype=torch.float64)
    np.testing.assert_array_equal(model.default_betas.numpy(), cluster_means[1])
    torch.testing.assert_close(model.family_mean_betas(1), torch.as_tensor(cluster_means[1]))
    pose = 0.1 * torch.randn(3, 35, 3, dtype=torch.float64)
    default = model(pose=pose)
    explicit = model(betas=torch.as_tensor(cluster_means[1]).expand(3, 41), pose=pose)
    torch.testing.assert_close(default.vertices, explicit.vertices, rtol=0, atol=0)
    assert not torch.allclose(default.vertices, model(betas=torch.zeros(3, 41), pose=pose).vertices)
    with pytest.raises(ValueError, match="family 5 out of range"):
        model.family_mean_betas(5)
    with pytest.raises(ValueError, match="no shape-family data"):
        SMAL.from_file(model_path).family_mean_betas(0)


def test_family_file_with_more_betas_than_model_is_refused(tmp_path: Path):
    family_file = _fixture("my_smpl_data_00781_4_all.pkl")
    model_path = write_smal_pickle(tmp_path / "m.pkl", make_model_data(35, 20, 40), 2)
    with pytest.raises(SMALFileError, match=r"cluster_means has shape \(5, 41\)"):
        load_smal_model_data(model_path, family_data=family_file)


def test_os_system_reduce_is_refused_and_not_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    for module in (b"os", b"posix"):
        bad = tmp_path / f"bad_{module.decode()}.pkl"
        bad.write_bytes(
            b"(dp0\nS'v_template'\nc" + module + b"\nsystem\n(S'touch " + str(marker).encode() + b"'\ntRs."
        )
        with pytest.raises(ForbiddenPickleClass, match=rf"{module.decode()}\.system") as info:
            load_pickle_restricted(bad)
        assert str(bad) in str(info.value)
        assert not marker.exists()


def test_arbitrary_classes_are_refused(tmp_path: Path):
    path = tmp_path / "ordered.pkl"
    path.write_bytes(pickle.dumps({"x": OrderedDict(a=1)}, protocol=2))
    with pytest.raises(ForbiddenPickleClass, match=r"collections\.OrderedDict"):
        load_pickle_restricted(path)
    # allowed callables are still guarded against abuse
    path.write_bytes(b"ccopy_reg\n_reconstructor\n(cnumpy\nndarray\nc__builtin__\nobject\nNtR.")
    with pytest.raises(ForbiddenPickleClass, match=r"ordered\.pkl: copy_reg\._reconstructor"):
        load_pickle_restricted(path)
    path.write_bytes(b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.")
    with pytest.raises(ForbiddenPickleClass, match="rot13"):
        load_pickle_restricted(path)


def test_unreadable_and_missing_files(tmp_path: Path):
    with pytest.raises(SMALFileNotFoundError, match="no such file") as info:
        load_smal_model_data(tmp_path / "absent.pkl")
    assert isinstance(info.value, FileNotFoundError)
    good = write_smal_pickle(tmp_path / "m.pkl", make_model_data(33, 3, 30), 2).read_bytes()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(SMALFileError, match="not a readable pickle"):
        load_pickle_restricted(truncated)
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(SMALFileError, match="expected a pickled dict"):
        load_pickle_restricted(listing)


def _write_raw(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "edited.pkl"
    path.write_bytes(py2_dumps(raw, 2))
    return path


def test_malformed_model_files_give_clear_errors(tmp_path: Path):
    data = make_model_data(35, 4, 30)
    raw = smal_file_dict(data)
    raw["posedirs"] = np.zeros((30, 3, 10))
    with pytest.raises(
        SMALFileError, match=r"posedirs has shape \(30, 3, 10\), expected \(V, 3, \(J-1\)\*9\)"
    ):
        load_smal_model_data(_write_raw(tmp_path, raw))

    raw = smal_file_dict(data)
    del raw["weights"]
    with pytest.raises(
        SMALFileError, match=r"edited\.pkl: not a SMAL model file: missing keys \['weights'\]"
    ):
        load_smal_model_data(_write_raw(tmp_path, raw))

    raw = smal_file_dict(data)
    raw["kintree_table"] = raw["kintree_table"].copy()
    raw["kintree_table"][0, 3] = 10
    with pytest.raises(SMALFileError, match="kintree_table column 3 has parent id 10"):
        load_smal_model_data(_write_raw(tmp_path, raw))

    raw = smal_file_dict(data)
    raw["shapedirs"] = FakeChExpression(FakeCh(data.shapedirs), FakeCh(data.shapedirs))
    with pytest.raises(SMALFileError, match=r"shapedirs is a chumpy chumpy\.ch_ops\.add expression"):
        load_smal_model_data(_write_raw(tmp_path, raw))

    raw = smal_file_dict(data)
    raw["keypoint_groups"] = raw["keypoint_groups"][:5]
    with pytest.raises(SMALFileError, match="keypoint_groups has 5 groups, expected 26"):
        load_smal_model_data(_write_raw(tmp_path, raw))


def test_save_then_load_round_trip_is_exact(tmp_path: Path):
    data = make_model_data(35, 6, 50, seed=3)
    data.part_labels = np.random.default_rng(0).integers(1, len(layout.FINE_PARTS), size=50)
    data.beta_names = [f"b{i}" for i in range(6)]
    data.family_means = np.random.default_rng(1).normal(size=(5, 4))
    data.extra = {"vert_sym_idxs": np.arange(50)[::-1].copy()}
    data.name = "round-trip"
    path = tmp_path / "saved.pkl"
    save_smal_pickle(data, path)

    raw = load_pickle_restricted(path)
    assert scipy.sparse.issparse(raw["J_regressor"]) and raw["kintree_table"].shape == (2, 35)
    loaded = load_smal_model_data(path)
    _assert_same_model(loaded, data)
    np.testing.assert_array_equal(loaded.part_labels, data.part_labels)
    np.testing.assert_array_equal(loaded.family_means, data.family_means)
    np.testing.assert_array_equal(loaded.extra["vert_sym_idxs"], data.extra["vert_sym_idxs"])
    assert loaded.beta_names == data.beta_names and loaded.name == "round-trip"


def test_builtin_model_exports_and_reads_back(tmp_path: Path):
    builtin = pytest.importorskip(
        "prf.body.builtin", reason="the built-in quadruped module is not written yet"
    )
    data = builtin.build_quadruped()
    path = tmp_path / "builtin.pkl"
    save_smal_pickle(data, path)
    loaded = load_smal_model_data(path)
    _assert_same_model(loaded, data)
    assert loaded.name == data.name and loaded.beta_names == data.beta_names
    pose = 0.1 * torch.randn(1, data.num_joints, 3)
    torch.testing.assert_close(SMAL(loaded)(pose=pose).vertices, SMAL(data)(pose=pose).vertices)


def test_npy_dict_loads_and_is_restricted(tmp_path: Path):
    path = tmp_path / "ann.npy"
    np.save(path, {"pose": np.arange(105.0), "prompt": "a dog", "seed": 7}, allow_pickle=True)
    loaded = load_pickle_restricted(path)
    np.testing.assert_array_equal(loaded["pose"], np.arange(105.0))
    assert loaded["prompt"] == "a dog" and loaded["seed"] == 7

    evil = tmp_path / "evil.npy"
    np.save(evil, {"x": OrderedDict(a=1)}, allow_pickle=True)
    with pytest.raises(ForbiddenPickleClass, match=r"collections\.OrderedDict"):
        load_pickle_restricted(evil)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(SMALFileError, match="expected a pickled dict"):
        load_pickle_restricted(plain)
