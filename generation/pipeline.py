"""The 3D-DST pipeline for animals: plan -> pose the body -> render -> condition -> backend -> BATCH.

Every image is a pure function of (config, image index): its random generator is seeded from
(seed, index), so a shard or a resumed run makes exactly the files an uninterrupted run makes.
For an image with an injected failure the picture (and its Canny condition) comes from the perturbed
state, while the annotation and the part mask keep the intended state, as a diffusion failure would.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from generation.backends.base import GenerationBackend, GenerationRequest
from generation.condition import make_condition
from generation.config import CategoryConfig, CategoryTable, GenerationConfig
from generation.failures import ImageState, inject_failure, leg_joints, stretch_leg
from generation.pose_sources import PoseSource
from generation.prompts import prompt_for
from generation.render import Renderer, RenderResult
from generation.viewpoints import sample_viewpoints
from prf.body import SMAL
from prf.body.layout import FINE_PARTS, FINE_TO_COARSE
from prf.data.annotation import Annotation
from prf.data.batch import BatchWriter
from prf.geometry import intrinsics, look_at

NUM_SAVED_BETAS = 41  # Animal3D stores 20 + 21 betas; models with fewer fill the first entries


def shard_indices(n: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The image indices of shard (i, N) of an n-image batch: every k < n with k mod N = i."""
    i, parts = shard
    return [k for k in range(n) if k % parts == i]


@dataclass
class ImagePlan:
    """What one image will show. pose (J,3) axis-angle radians, betas (NB,), viewpoint in radians/metres."""

    index: int
    image_id: str
    seed: int
    category: CategoryConfig
    pose: np.ndarray
    betas: np.ndarray
    viewpoint: dict[str, float]
    failure: str
    severity: float


@dataclass
class PosedMesh:
    """A posed body: vertices (V,3), joints (J,3), keypoints (26,3) in metres, SMAL world frame."""

    vertices: np.ndarray
    joints: np.ndarray
    keypoints: np.ndarray


@dataclass
class RenderedStates:
    """One image's two renders: ``truth`` of the ``intended`` (annotated) mesh and ``shown``, what the picture
    shows (``truth`` itself for a faithful image); ``state`` the injected failure's pose, betas and hidden
    part; ``effect`` its size (``failure_effect``); camera K (3,3) pixels, R (3,3), t (3,) metres."""

    intended: PosedMesh
    truth: RenderResult
    shown: RenderResult
    state: ImageState
    effect: float
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray


@dataclass
class PreparedImage:
    """Everything but the backend's picture: the annotation side and the backend's inputs."""

    plan: ImagePlan
    request: GenerationRequest
    mask: np.ndarray
    annotation: Annotation
    record: dict[str, object]


def image_id_for(index: int) -> str:
    return f"{index:08d}"


def image_seed(seed: int, index: int) -> int:
    """A per-image seed (recorded in the annotation) derived from the run seed and the image index."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def face_labels_from_vertices(faces: np.ndarray, vertex_labels: np.ndarray) -> np.ndarray:
    """(F,) label per face: the label two or three of its vertices share, else its first vertex's."""
    a, b, c = (vertex_labels[faces[:, k]] for k in range(3))
    return np.where(b == c, b, a).astype(np.uint8)


class GenerationPipeline:
    """Makes BATCH images from a body model, a pose source, a renderer and a backend.

    The model is used on the CPU in float64-free float32; rendering is per image.
    """

    def __init__(
        self,
        config: GenerationConfig,
        model: SMAL,
        backend: GenerationBackend,
        categories: CategoryTable,
        pose_source: PoseSource,
        renderer: Renderer | None = None,
    ) -> None:
        self.config = config
        self.model = model.eval()
        self.backend = backend
        self.pose_source = pose_source
        self.renderer = renderer or Renderer()
        names = config.categories or [c.name for c in categories.categories]
        self.categories = [categories.by_name(n) for n in names]
        self.joint_names = list(model.joint_names)
        self.faces = model.faces.cpu().numpy().astype(np.int64)
        self.vertex_parts = model.part_labels.cpu().numpy()
        self.face_parts = face_labels_from_vertices(self.faces, self.vertex_parts)
        self.lbs_weights = model.lbs_weights.detach().cpu().double().numpy()
        self.keypoint_regressor = model.keypoint_regressor.detach().cpu().double().numpy()
        self._legs = leg_joints(self.joint_names) if config.inject_failures > 0 else {}

    # -- planning -------------------------------------------------------------------------------------
    def plan(self, index: int) -> ImagePlan:
        cfg = self.config
        seed = image_seed(cfg.seed, index)
        rng = np.random.default_rng(seed)
        category = self.categories[int(rng.integers(len(self.categories)))]
        viewpoint = sample_viewpoints(category.viewpoint, 1, rng).row(0)
        viewpoint["distance"] *= cfg.distance_scale()
        pose = self.pose_source.pose(rng)
        betas = self._sample_betas(category, rng)
        failure, severity = "none", 0.0
        if cfg.inject_failures > 0 and rng.random() < cfg.inject_failures:
            failure = cfg.failure_types[int(rng.integers(len(cfg.failure_types)))]
            severity = float(rng.uniform(*cfg.severity_range))
        return ImagePlan(
            index, image_id_for(index), seed, category, pose, betas, viewpoint, failure, severity
        )

    def _sample_betas(self, category: CategoryConfig, rng: np.random.Generator) -> np.ndarray:
        nb = self.model.num_betas
        mean = np.zeros(nb)
        family_means = self.model.family_means
        if family_means is not None and category.supercategory < family_means.shape[0]:
            mean = self.model.family_mean_betas(category.supercategory).double().numpy()
        elif category.beta_mean:
            k = min(nb, len(category.beta_mean))
            mean[:k] = category.beta_mean[:k]
        return mean + category.beta_std * rng.standard_normal(nb)

    # -- posing and rendering -------------------------------------------------------------------------
    def pose_mesh(
        self, pose: np.ndarray, betas: np.ndarray, leg_scale: tuple[str, float] | None
    ) -> PosedMesh:
        with torch.no_grad():
            out = self.model(
                betas=torch.as_tensor(betas, dtype=torch.float32)[None],
                pose=torch.as_tensor(pose, dtype=torch.float32)[None],
            )
        vertices = out.vertices[0].double().numpy()
        joints = out.joints[0].double().numpy()
        if leg_scale is None:
            return PosedMesh(vertices, joints, out.keypoints[0].double().numpy())
        leg, factor = leg_scale
        vertices = stretch_leg(vertices, joints, self.lbs_weights, self._legs[leg], factor)
        return PosedMesh(vertices, joints, self.keypoint_regressor @ vertices)

    def _render(
        self,
        mesh: PosedMesh,
        K: np.ndarray,
        R: np.ndarray,
        t: np.ndarray,
        light: np.ndarray,
        hidden: str | None,
    ) -> RenderResult:
        size = self.config.image_size
        face_mask = None if hidden is None else self.face_parts != FINE_PARTS.index(hidden)
        return self.renderer.render(
            mesh.vertices, self.faces, self.face_parts, K, R, t, size, size,
            keypoints_3d=mesh.keypoints, light_dir=light, fine_to_coarse=FINE_TO_COARSE, face_mask=face_mask,
        )  # fmt: skip

    def render_states(self, plan: ImagePlan) -> RenderedStates:
        """Pose and render one planned image: its intended state and, for an injected failure, the state the
        picture shows instead (for a faithful image, the same render twice). Deterministic in the plan."""
        cfg = self.config
        rng = np.random.default_rng([plan.seed, 1])
        intended = self.pose_mesh(plan.pose, plan.betas, None)
        target = torch.as_tensor(bbox_centre(intended.vertices))[None]
        vp = plan.viewpoint
        angles = (vp["azimuth"], vp["elevation"], vp["theta"], vp["distance"])
        R, t = look_at(*(torch.tensor([v], dtype=torch.float64) for v in angles), target=target)
        R, t = R[0].double().numpy(), t[0].double().numpy()
        size = cfg.image_size
        K = intrinsics(cfg.focal_length(), size, size).double().numpy()
        light = rng.normal(size=3)
        light[2] = abs(light[2]) + 0.5  # mostly from above
        light /= np.linalg.norm(light)

        truth = self._render(intended, K, R, t, light, None)
        state = ImageState(pose=plan.pose, betas=plan.betas)
        shown, effect = truth, 0.0
        if plan.failure != "none":
            state = inject_failure(plan.failure, plan.pose, plan.betas, self.joint_names, plan.severity, rng)
            image_mesh = self.pose_mesh(state.pose, state.betas, state.leg_scale)
            if plan.failure == "orientation_flip":
                image_mesh = recentre_horizontally(image_mesh, intended)
            shown = self._render(image_mesh, K, R, t, light, state.hidden_part)
            effect = failure_effect(truth, shown, state.hidden_part)
        return RenderedStates(intended, truth, shown, state, effect, K, R, t)

    def prepare(self, plan: ImagePlan) -> PreparedImage:
        """Pose, render and annotate one planned image (everything except the backend's picture)."""
        cfg = self.config
        states = self.render_states(plan)
        shown, effect = states.shown, states.effect
        render_rgb = np.repeat((shown.shading * 255.0).astype(np.uint8)[..., None], 3, axis=2)
        condition = make_condition(render_rgb, short_side=cfg.resolved_condition_side())
        prompt, negative = prompt_for(plan.category.prompt_name)
        request = GenerationRequest(
            image_id=plan.image_id, seed=plan.seed, prompt=prompt, negative_prompt=negative,
            condition=condition, render=shown, category=plan.category.name,
        )  # fmt: skip
        annotation = self._annotation(
            plan, states.intended, states.truth, states.K, states.R, states.t, prompt
        )
        record = {
            "image_id": plan.image_id,
            "category": plan.category.name,
            "category_id": plan.category.category_id,
            "backend": self.backend.name,
            "seed": plan.seed,
            "injected_failure": plan.failure,
            "failure_severity": plan.severity,
            "failure_effect": float(effect),
            "width": cfg.image_size,
            "height": cfg.image_size,
        }
        return PreparedImage(plan, request, states.truth.part_fine, annotation, record)

    def _annotation(
        self, plan: ImagePlan, mesh: PosedMesh, truth: RenderResult, K: np.ndarray, R: np.ndarray,
        t: np.ndarray, prompt: str,
    ) -> Annotation:  # fmt: skip
        betas = np.zeros(NUM_SAVED_BETAS)
        betas[: min(NUM_SAVED_BETAS, plan.betas.shape[0])] = plan.betas[:NUM_SAVED_BETAS]
        ext = self.config.image_format
        return Annotation(
            img_path=f"images/{plan.image_id}.{ext}",
            mask_path=f"masks/{plan.image_id}.png",
            bbox=[float(v) for v in truth.bbox],
            width=self.config.image_size,
            height=self.config.image_size,
            keypoint_2d=truth.keypoints_2d.astype(float).tolist(),
            keypoint_3d=mesh.keypoints.astype(float).tolist(),
            pose=plan.pose.reshape(-1).astype(float).tolist(),
            shape=betas[:20].tolist(),
            shape_extra=betas[20:].tolist(),
            trans=[0.0, 0.0, 0.0],
            category=plan.category.category_id,
            supercategory=plan.category.supercategory,
            camera={"K": K.tolist(), "R": R.tolist(), "t": t.tolist()},
            viewpoint=plan.viewpoint,
            prompt=prompt,
            seed=plan.seed,
            backend=self.backend.name,
            category_name=plan.category.name,
        )

    # -- running --------------------------------------------------------------------------------------
    def indices(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        return shard_indices(self.config.n, shard)

    def run(
        self,
        writer: BatchWriter,
        shard: tuple[int, int] = (0, 1),
        workers: int = 2,
        on_image: Callable[[dict[str, object]], None] | None = None,
    ) -> dict[str, int]:
        """Generate every unfinished image of this shard into `writer`; returns counts (made, skipped).

        Preparation (posing, ray casting, Canny) runs in a thread pool ahead of the backend, so for the
        diffusion backend the next batch is ready while the model runs.
        """
        todo = [k for k in self.indices(shard) if not writer.is_done(image_id_for(k))]
        skipped = len(self.indices(shard)) - len(todo)
        shard_label = f"{shard[0]}/{shard[1]}"
        made = 0
        lookahead = 2 * max(workers, self.backend.preferred_batch_size)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            prepared = _bounded_map(pool, lambda k: self.prepare(self.plan(k)), todo, lookahead)
            for chunk in _chunks(prepared, self.backend.preferred_batch_size):
                images = self.backend.generate([p.request for p in chunk])
                for item, image in zip(chunk, images, strict=True):
                    image = to_annotation_frame(image, self.config.image_size)
                    record = dict(item.record, shard=shard_label)
                    writer.write_image(
                        item.plan.image_id, image, item.mask, item.request.condition, item.annotation, record
                    )
                    made += 1
                    if on_image is not None:
                        on_image(record)
        return {"made": made, "skipped": skipped}


def bbox_centre(vertices: np.ndarray) -> np.ndarray:
    """(3,) centre of the axis-aligned bounding box of (V, 3) points."""
    return (vertices.min(axis=0) + vertices.max(axis=0)) / 2.0


def recentre_horizontally(mesh: PosedMesh, reference: PosedMesh) -> PosedMesh:
    """Shift a mesh in x and y so its bounding-box centre matches the reference's.

    The global orientation turns the body about its root joint, not about the centre the camera looks at;
    without this a turned animal would also slide sideways in the frame, a cue unrelated to orientation.
    """
    shift = (bbox_centre(reference.vertices) - bbox_centre(mesh.vertices)) * np.array([1.0, 1.0, 0.0])
    return PosedMesh(mesh.vertices + shift, mesh.joints + shift, mesh.keypoints + shift)


def to_annotation_frame(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a backend's picture (made at the condition's size, a multiple of 64) back to the render's
    size x size frame, in which the annotation and the mask are expressed."""
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def failure_effect(
    truth: RenderResult, shown: RenderResult, hidden_part: str | None, visible_only: bool = False
) -> float:
    """How much an injected failure changed the image, in units of sqrt(silhouette area).

    The largest image-space displacement of a keypoint between the intended and the rendered state. For a
    hidden limb (no displacement to measure) it is sqrt(area of the vanished limb), in the same units.
    ``visible_only``: only keypoints visible (inside the image, not occluded) in at least one of the two
    renders count, 0 when none moved; a keypoint hidden in both moves nothing the picture shows. The BATCH
    records the plain effect; benchmarks/failure_visibility.py measures this one.
    """
    area = float(truth.silhouette.sum())
    if area <= 0:
        return 0.0
    if hidden_part is not None:
        gone = float((truth.part_fine == FINE_PARTS.index(hidden_part)).sum())
        return float(np.sqrt(gone / area))
    shift = np.linalg.norm(truth.keypoints_2d[:, :2] - shown.keypoints_2d[:, :2], axis=1)
    if visible_only:
        seen = (truth.keypoints_2d[:, 2] > 0) | (shown.keypoints_2d[:, 2] > 0)
        shift = shift[seen] if seen.any() else np.zeros(1)
    return float(shift.max() / np.sqrt(area))


def _bounded_map(
    pool: ThreadPoolExecutor, func: Callable[[int], PreparedImage], items: list[int], lookahead: int
) -> Iterator[PreparedImage]:
    """Like pool.map, in order, but with at most `lookahead` tasks in flight (memory stays bounded)."""
    pending: deque[Future[PreparedImage]] = deque()
    for item in items:
        pending.append(pool.submit(func, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(items: Iterator[PreparedImage], size: int) -> Iterator[Sequence[PreparedImage]]:
    chunk: list[PreparedImage] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
