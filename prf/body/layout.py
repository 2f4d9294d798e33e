"""SMAL's joint layout, the Animal3D 26 keypoints and the part taxonomy.

Everything here is a plain constant or a small function of joint names, so that a loaded SMAL file (whose
kinematic tree comes from its own ``kintree_table``) and the built-in quadruped share one vocabulary.

Frame: SMAL's canonical frame, x forward (head at +x), y to the animal's left, z up, metres.
"""

from __future__ import annotations

import numpy as np

# The 35-joint SMALST / Animal3D layout (the public CVPR 2017 file has the first 33).
JOINT_NAMES_35: tuple[str, ...] = (
    "pelvis", "pelvis0", "spine", "spine0", "spine1", "spine2", "spine3",
    "LLeg1", "LLeg2", "LLeg3", "LFoot",
    "RLeg1", "RLeg2", "RLeg3", "RFoot",
    "Neck", "Head",
    "LLegBack1", "LLegBack2", "LLegBack3", "LFootBack",
    "RLegBack1", "RLegBack2", "RLegBack3", "RFootBack",
    "Tail1", "Tail2", "Tail3", "Tail4", "Tail5", "Tail6", "Tail7",
    "Mouth", "LEar", "REar",
)  # fmt: skip
JOINT_NAMES_33: tuple[str, ...] = JOINT_NAMES_35[:33]

# Parents of the 35-joint layout: spine chain from the pelvis, front legs and neck from spine3, head from
# the neck, back legs and tail from the pelvis, mouth and ears from the head. Only the built-in model uses
# this table; a loaded SMAL file always brings its own kintree_table.
PARENTS_35: tuple[int, ...] = (
    -1, 0, 1, 2, 3, 4, 5,
    6, 7, 8, 9,
    6, 11, 12, 13,
    6, 15,
    0, 17, 18, 19,
    0, 21, 22, 23,
    0, 25, 26, 27, 28, 29, 30,
    16, 16, 16,
)  # fmt: skip

# Animal3D's 26 keypoints (indices are the contract; names differ between projects).
KEYPOINT_NAMES: tuple[str, ...] = (
    "left_eye", "right_eye", "chin",
    "left_front_paw", "right_front_paw", "left_back_paw", "right_back_paw",
    "tail_base",
    "left_front_elbow", "right_front_elbow", "left_back_knee", "right_back_knee",
    "left_shoulder", "right_shoulder",
    "left_front_wrist", "right_front_wrist", "left_back_hock", "right_back_hock",
    "neck", "tail_end", "left_ear", "right_ear",
    "left_mouth_corner", "right_mouth_corner", "nose", "tail_middle",
)  # fmt: skip
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
ROOT_KEYPOINT = 7  # tail base: the root for MPJPE

# Keypoint index -> its mirror image under a left/right flip.
KEYPOINT_FLIP: tuple[int, ...] = (
    1,
    0,
    2,
    4,
    3,
    6,
    5,
    7,
    9,
    8,
    11,
    10,
    13,
    12,
    15,
    14,
    17,
    16,
    18,
    19,
    21,
    20,
    23,
    22,
    24,
    25,
)

# Limb chains over keypoint indices (shoulder/hip -> paw), for drawing and per-limb errors.
KEYPOINT_LIMBS: dict[str, tuple[int, ...]] = {
    "left_front_leg": (12, 8, 14, 3),
    "right_front_leg": (13, 9, 15, 4),
    "left_back_leg": (7, 10, 16, 5),
    "right_back_leg": (7, 11, 17, 6),
    "head": (18, 2, 24),
    "tail": (7, 25, 19),
}

# Vertex groups of the 26 keypoints on the real 3889-vertex SMAL mesh (keypoint = mean of its group).
SMAL_KEYPOINT_VERTEX_GROUPS: tuple[tuple[int, ...], ...] = (
    (1068, 1080, 1029, 1226),
    (2660, 3030, 2675, 3038),
    (910,),
    (360, 1203, 1235, 1230),
    (3188, 3156, 2327, 3183),
    (1976, 1974, 1980, 856),
    (3854, 2820, 3852, 3858),
    (452, 1811),
    (416, 235, 182),
    (2156, 2382, 2203),
    (829,),
    (2793,),
    (60, 114, 186, 59),
    (2091, 2037, 2036, 2160),
    (384, 799, 1169, 431),
    (2351, 2763, 2397, 3127),
    (221, 104),
    (2754, 2192),
    (191, 1158, 3116, 2165),
    (28, 1109, 1110, 1111, 1835, 1836, 3067, 3068, 3069),
    tuple(range(498, 504)),
    tuple(range(2463, 2469)),
    (764, 915, 916, 917, 934, 935, 956),
    (2878, 2879, 2880, 2897, 2898, 2919, 3751),
    (1039, 1845, 1846, 1870, 1879, 1919, 2997, 3761, 3762),
    (0, 464, 465, 726, 1824, 2429, 2430, 2690),
)
SMAL_NUM_VERTICES = 3889

# Fine part taxonomy (0 is background in every mask) and its map onto PartImageNet's quadruped parts.
FINE_PARTS: tuple[str, ...] = (
    "background", "head", "neck", "torso",
    "left_front_leg", "right_front_leg", "left_back_leg", "right_back_leg",
    "tail", "left_ear", "right_ear",
)  # fmt: skip
COARSE_PARTS: tuple[str, ...] = ("background", "head", "torso", "leg", "tail")
# fine index -> coarse index. The neck counts as torso, the ears as head (PartImageNet's quadruped "Head"
# is the head proper; its "Body" runs up the neck).
FINE_TO_COARSE: tuple[int, ...] = (0, 1, 2, 2, 3, 3, 3, 3, 4, 1, 1)
FINE_PART_FLIP: tuple[int, ...] = (0, 1, 2, 3, 5, 4, 7, 6, 8, 10, 9)


def fine_part_of_joint(name: str) -> int:
    """Fine part index (into FINE_PARTS) of a SMAL joint, by name."""
    if name.startswith("Tail"):
        return FINE_PARTS.index("tail")
    if name in ("Head", "Mouth"):
        return FINE_PARTS.index("head")
    if name == "LEar":
        return FINE_PARTS.index("left_ear")
    if name == "REar":
        return FINE_PARTS.index("right_ear")
    if name == "Neck":
        return FINE_PARTS.index("neck")
    if name.startswith(("LLegBack", "LFootBack")):
        return FINE_PARTS.index("left_back_leg")
    if name.startswith(("RLegBack", "RFootBack")):
        return FINE_PARTS.index("right_back_leg")
    if name.startswith(("LLeg", "LFoot")):
        return FINE_PARTS.index("left_front_leg")
    if name.startswith(("RLeg", "RFoot")):
        return FINE_PARTS.index("right_front_leg")
    return FINE_PARTS.index("torso")


def mirror_joint_name(name: str) -> str:
    """Name of the joint's mirror image (LLeg1 <-> RLeg1, LEar <-> REar; midline joints map to themselves)."""
    if name.startswith("L") and name[1:2].isupper():
        return "R" + name[1:]
    if name.startswith("R") and name[1:2].isupper():
        return "L" + name[1:]
    return name


def joint_flip_permutation(joint_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """(J,) int: index of each joint's mirror image, for left/right flip augmentation."""
    index = {n: i for i, n in enumerate(joint_names)}
    return np.array([index.get(mirror_joint_name(n), i) for i, n in enumerate(joint_names)], dtype=np.int64)
