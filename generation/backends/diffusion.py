"""The `diffusers` backend: Stable Diffusion 1.5 + ControlNet v1.1 Canny, with 3D-DST's settings.

Weights are never downloaded. Each model is given as either
- a local folder in save_pretrained layout (the base: a folder with model_index.json and unet/, vae/,
  text_encoder/, tokenizer/, scheduler/; the ControlNet: a folder with config.json), or
- a Hugging Face repo id ("runwayml/stable-diffusion-v1-5") already in the hub cache (HF_HOME /
  HF_HUB_CACHE, or `cache_dir`), e.g. filled beforehand with `hf download <id>`.
Everything loads with local_files_only=True, so HF_HUB_OFFLINE=1 runs work. Missing weights raise
`ModelWeightsNotFoundError` from the constructor, before any image is planned or rendered.

Settings (3D-DST): DDIM from the pipeline's scheduler config, 20 steps, guidance 9.0, eta 1.0, ControlNet
conditioning scale 1.0, no safety checker, float16 on CUDA and float32 on CPU. Every image draws its
noise from its own `torch.Generator(device).manual_seed(request.seed)`, so an image does not depend on the
batch it was generated in (up to float rounding).

Overlap: the pipeline runs in one background worker thread. `generate_async(requests)` validates the
requests, queues them and returns a `concurrent.futures.Future` at once, so the caller can pose, render
and compute Canny conditions for the next batch while the model runs; queued calls run one after another
in submission order. `generate(requests)` is `generate_async(requests).result()`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from diffusers.utils import is_accelerate_available
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from packaging.version import Version
from PIL import Image

from generation.backends.base import (
    GenerationBackend,
    GenerationRequest,
    register_backend,
    validate_requests,
)

DEFAULT_BASE_MODEL = "runwayml/stable-diffusion-v1-5"
DEFAULT_CONTROLNET_MODEL = "lllyasviel/control_v11p_sd15_canny"
BASE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype and deprecated the old name; older
# versions only know torch_dtype (an ignored dtype is caught after loading, see _load).
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelWeightsNotFoundError(FileNotFoundError):
    """Model weights are neither in the given local folder nor in the Hugging Face cache."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a model's files were found. source: as given; kind: "local" or "hf-cache"; path: the folder."""

    source: str
    kind: str
    path: Path


def _how_to_provide(what: str, marker: str) -> str:
    return (
        f"Provide the {what} either as a local folder in save_pretrained layout (with {marker}), or as a "
        "Hugging Face repo id already in the hub cache (download it once on a connected machine with "
        "`hf download <repo id>` and point HF_HOME or cache_dir at that cache). "
        "Weights are never downloaded by this backend."
    )


def resolve_weights(
    source: str | Path, what: str, marker: str, cache_dir: str | Path | None
) -> ResolvedWeights:
    """Find the folder of `source` (a local folder or a cached hub repo id) holding `marker`.

    what: a name for messages ("base model"); marker: the file that proves the layout ("model_index.json").
    Raises ModelWeightsNotFoundError saying what was looked for, where, and how to provide it.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise ModelWeightsNotFoundError(
                f"{what}: the folder {path} exists but has no {marker}, so it is not in save_pretrained "
                f"layout. {_how_to_provide(what, marker)}"
            )
        return ResolvedWeights(text, "local", path.resolve())
    if text.startswith((".", "~")) or not _REPO_ID.match(text):
        raise ModelWeightsNotFoundError(
            f"{what}: local folder {path} does not exist. {_how_to_provide(what, marker)}"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(hub_constants.HF_HUB_CACHE)
    found = try_to_load_from_cache(text, marker, cache_dir=cache)
    if not isinstance(found, str):
        raise ModelWeightsNotFoundError(
            f"{what}: {text!r} is neither a local folder nor a repo in the Hugging Face cache {cache} "
            f"(no {marker} there). {_how_to_provide(what, marker)}"
        )
    return ResolvedWeights(text, "hf-cache", Path(found).parent)


def _check_base_components(weights: ResolvedWeights) -> None:
    missing = [name for name in BASE_COMPONENTS if not (weights.path / name).is_dir()]
    if missing:
        raise ModelWeightsNotFoundError(
            f"base model: {weights.path} (from {weights.source!r}) lacks the component folders {missing}; "
            f"a Stable Diffusion 1.5 folder needs {list(BASE_COMPONENTS)}. "
            f"{_how_to_provide('base model', 'model_index.json')}"
        )


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_backend("diffusers")
class DiffusersControlNetBackend(GenerationBackend):
    """Stable Diffusion 1.5 + ControlNet Canny from local weights; see the module docstring.

    base_model / controlnet_model: local folders or cached hub repo ids. batch_size: images per pipeline
    call (default 8 on CUDA, 2 on CPU). device: "cuda", "cuda:1", "cpu" (default: CUDA if available).
    dtype: "float16", "bfloat16" or "float32" (default float16 on CUDA, float32 on CPU). cache_dir: the hub
    cache to look repo ids up in (default HF_HUB_CACHE). variant: a weight file variant such as "fp16".
    """

    name = "diffusers"

    def __init__(
        self,
        base_model: str = DEFAULT_BASE_MODEL,
        controlnet_model: str = DEFAULT_CONTROLNET_MODEL,
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 9.0,
        eta: float = 1.0,
        controlnet_conditioning_scale: float = 1.0,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: str | None = None,
        variant: str | None = None,
    ) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0 or controlnet_conditioning_scale < 0:
            raise ValueError("guidance_scale and controlnet_conditioning_scale must be >= 0")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (DDIM noise weight), got {eta}")
        self.device = torch.device(device or _default_device())
        on_cuda = self.device.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, but torch sees no GPU here; use device='cpu'")
        dtype_name = dtype or ("float16" if on_cuda else "float32")
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype {dtype_name!r} is not one of {list(DTYPES)}")
        self.dtype = DTYPES[dtype_name]
        self.batch_size = batch_size if batch_size is not None else (8 if on_cuda else 2)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.controlnet_conditioning_scale = float(controlnet_conditioning_scale)
        self.variant = variant
        # Resolve both models before loading either, so a missing one fails before any work.
        self.base = resolve_weights(base_model, "base model", "model_index.json", cache_dir)
        self.controlnet = resolve_weights(controlnet_model, "ControlNet", "config.json", cache_dir)
        _check_base_components(self.base)
        self._pipe = self._load()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers-backend")

    def _load(self) -> StableDiffusionControlNetPipeline:
        common: dict[str, Any] = {
            _DTYPE_KWARG: self.dtype,
            "local_files_only": True,
            "variant": self.variant,
            "low_cpu_mem_usage": is_accelerate_available(),
        }
        try:
            controlnet = ControlNetModel.from_pretrained(self.controlnet.path, **common)
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                self.base.path,
                controlnet=controlnet,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **common,
            )
        except OSError as exc:
            raise ModelWeightsNotFoundError(
                f"could not load the weights from {self.base.path} and {self.controlnet.path}: {exc}. "
                f"{_how_to_provide('models', 'model_index.json / config.json')}"
            ) from exc
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if pipe.unet.dtype != self.dtype:  # a diffusers that ignored the dtype keyword
            pipe = pipe.to(dtype=self.dtype)
        return pipe.to(self.device)

    @property
    def preferred_batch_size(self) -> int:
        return self.batch_size

    def generate_async(self, requests: Sequence[GenerationRequest]) -> Future[list[np.ndarray]]:
        """Validate now, run in the worker thread; the Future gives one (H, W, 3) uint8 image per request."""
        requests = list(requests)
        validate_requests(requests)
        return self._worker.submit(self._run, requests)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
        """One (H, W, 3) uint8 image per request, the size of its condition; blocks until done."""
        return self.generate_async(requests).result()

    def _run(self, requests: list[GenerationRequest]) -> list[np.ndarray]:
        images: dict[int, np.ndarray] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, req in enumerate(requests):
            by_size.setdefault(req.condition.shape[:2], []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, image in zip(chunk, self._call([requests[i] for i in chunk]), strict=True):
                    images[index] = image
        return [images[index] for index in range(len(requests))]

    def _call(self, requests: list[GenerationRequest]) -> np.ndarray:
        """(B, H, W, 3) uint8 images of same-sized requests from one pipeline call."""
        height, width = requests[0].condition.shape[:2]
        generators = [torch.Generator(device=self.device).manual_seed(int(r.seed)) for r in requests]
        output = self._pipe(
            prompt=[r.prompt for r in requests],
            negative_prompt=[r.negative_prompt for r in requests],
            image=[Image.fromarray(r.condition) for r in requests],
            height=height,
            width=width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            eta=self.eta,
            controlnet_conditioning_scale=self.controlnet_conditioning_scale,
            generator=generators,
            output_type="np",
        )
        return np.clip(np.rint(output.images * 255.0), 0, 255).astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        """Resolved settings: model sources and folders, sampler settings, device, dtype, versions."""
        return {
            "backend": self.name,
            "base_model": self.base.source,
            "base_model_path": str(self.base.path),
            "base_model_from": self.base.kind,
            "controlnet_model": self.controlnet.source,
            "controlnet_model_path": str(self.controlnet.path),
            "controlnet_model_from": self.controlnet.kind,
            "variant": self.variant,
            "scheduler": type(self._pipe.scheduler).__name__,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
            "controlnet_conditioning_scale": self.controlnet_conditioning_scale,
            "batch_size": self.batch_size,
            "device": str(self.device),
            "dtype": str(self._pipe.unet.dtype).removeprefix("torch."),
            "safety_checker": None,
            "seeding": "torch.Generator(device).manual_seed(request.seed) per image",
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
        }

    def close(self) -> None:
        """Wait for queued calls, then stop the worker thread."""
        self._worker.shutdown(wait=True)
