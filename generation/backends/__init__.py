"""Image backends: the interface, the registry and the request type (see `generation.backends.base`).

Built-in backends: "render" (shades the rendered mesh, no model weights) and "diffusers"
(Stable Diffusion 1.5 + ControlNet Canny, `generation.backends.diffusion`). They are imported by
`build_backend` on first use, so importing this package stays light.
"""

from generation.backends.base import (
    CONDITION_MULTIPLE,
    GenerationBackend,
    GenerationRequest,
    available_backends,
    backend_class,
    build_backend,
    register_backend,
    validate_requests,
)

__all__ = [
    "CONDITION_MULTIPLE",
    "GenerationBackend",
    "GenerationRequest",
    "available_backends",
    "backend_class",
    "build_backend",
    "register_backend",
    "validate_requests",
]
