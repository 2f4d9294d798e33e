"""One interface for every image backend, and a tiny registry to build backends by name.

A backend turns Canny conditions (and, for the built-in `render` backend, the renderer's output) into
pictures. Shapes: H, W image height and width in pixels, both multiples of 64; images are (H, W, 3) uint8
RGB. The order of the returned images is the order of the requests.

Writing a backend::

    @register_backend("mine")
    class MyBackend(GenerationBackend):
        name = "mine"
        def generate(self, requests): ...
        def describe(self): ...

`build_backend("mine", **options)` then builds it; the built-in names import their module on first use,
so importing this package never imports torch or diffusers.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

CONDITION_MULTIPLE = 64  # condition height and width must be multiples of this many pixels


@dataclass
class GenerationRequest:
    """What a backend needs to make one image.

    image_id: the BATCH image id. seed: the per-image seed (recorded in the annotation); a backend that
    draws random numbers must draw them from this seed only. prompt / negative_prompt: text prompts
    (see `generation.prompts.prompt_for`). condition: (H, W, 3) uint8 Canny edge image, H and W multiples
    of 64; the output image has the same size. render: the renderer's `RenderResult` for backends that
    shade the mesh themselves (ignored by the diffusers backend). category: the category name.
    """

    image_id: str
    seed: int
    prompt: str
    negative_prompt: str
    condition: np.ndarray
    render: object | None
    category: str


def validate_requests(requests: Sequence[GenerationRequest], multiple: int = CONDITION_MULTIPLE) -> None:
    """Raise ValueError naming the first request whose seed or condition breaks the contract above."""
    for req in requests:
        cond = req.condition
        where = f"request {req.image_id!r}"
        if not isinstance(cond, np.ndarray) or cond.ndim != 3 or cond.shape[2] != 3:
            shape = getattr(cond, "shape", type(cond).__name__)
            raise ValueError(f"{where}: condition must be an (H, W, 3) numpy array, got {shape}")
        if cond.dtype != np.uint8:
            raise ValueError(f"{where}: condition must be uint8 (0..255), got {cond.dtype}")
        h, w = cond.shape[:2]
        if h == 0 or w == 0 or h % multiple or w % multiple:
            raise ValueError(
                f"{where}: condition size {h}x{w} px must be a positive multiple of {multiple} on both "
                "sides; resize the render before computing its Canny edges"
            )
        if not 0 <= int(req.seed) < 2**63:
            raise ValueError(f"{where}: seed {req.seed} must be in [0, 2**63)")


class GenerationBackend(abc.ABC):
    """Makes (H, W, 3) uint8 images from `GenerationRequest`s.

    Subclasses set `name` (the registry name, recorded as the annotation's `backend`) and implement
    `generate` and `describe`. `generate_async` lets a caller prepare the next batch while this one runs;
    the default runs `generate` at once and returns a finished Future, a backend with real work to overlap
    (a GPU model) overrides it. Backends are context managers; `close()` frees what they hold.
    """

    name: str = ""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
        """One (H, W, 3) uint8 image per request, H and W those of the request's condition."""

    def generate_async(self, requests: Sequence[GenerationRequest]) -> Future[list[np.ndarray]]:
        """`generate` wrapped in a Future; errors are raised by `Future.result()`."""
        future: Future[list[np.ndarray]] = Future()
        try:
            future.set_result(self.generate(requests))
        except Exception as exc:
            future.set_exception(exc)
        return future

    @property
    def preferred_batch_size(self) -> int:
        """How many requests one `generate` call should carry for good throughput."""
        return 1

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The resolved settings (JSON-serialisable), recorded in batch.json."""

    def close(self) -> None:
        """Release threads or models held by the backend (nothing to release by default)."""
        return None

    def __enter__(self) -> GenerationBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


B = TypeVar("B", bound=type[GenerationBackend])

_REGISTRY: dict[str, type[GenerationBackend]] = {}
# Built-in backends live in modules that import heavy packages; they are imported on first use.
_BUILTIN_MODULES = {
    "diffusers": "generation.backends.diffusion",
    "render": "generation.backends.render_backend",
}


def register_backend(name: str) -> Callable[[B], B]:
    """Class decorator: make `build_backend(name, ...)` build this backend class."""

    def decorate(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, GenerationBackend)):
            raise TypeError(f"@register_backend({name!r}) needs a GenerationBackend subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"backend name {name!r} is already taken by {known.__module__}.{known.__name__}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_backends() -> list[str]:
    """Names `build_backend` accepts (registered ones and the built-in ones not imported yet)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def backend_class(name: str) -> type[GenerationBackend]:
    """The class registered under `name`, importing a built-in backend's module when needed."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown generation backend {name!r}; choose one of {available_backends()}")
    return _REGISTRY[name]


def build_backend(name: str, **kwargs: Any) -> GenerationBackend:
    """Build the backend registered under `name` with its constructor's keyword arguments."""
    return backend_class(name)(**kwargs)
