"""The 3D animal core: SMAL model loading, the SMAL layer, the built-in quadruped, poses and layout.

from prf.body import SMAL
model = SMAL.builtin()                      # or SMAL.from_file("my_smpl_00781_4_all.pkl")
out = model(betas=betas, pose=pose)  # .vertices (B,V,3), .joints (B,J,3), .keypoints (B,26,3)
"""

from prf.body.model_data import SMALModelData
from prf.body.pickle_io import load_pickle_restricted, load_smal_model_data, save_smal_pickle
from prf.body.smal import SMAL, SMALOutput

__all__ = [
    "SMAL",
    "SMALModelData",
    "SMALOutput",
    "load_pickle_restricted",
    "load_smal_model_data",
    "save_smal_pickle",
]
