"""The diffusers ControlNet backend on a tiny random pipeline (64 px, 2 steps, CPU), plus prompts and the
backend registry."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from tiny_diffusers import TinyDiffusers, build_tiny_diffusers, install_in_hf_cache

from generation.backends import (
    GenerationRequest,
    available_backends,
    build_backend,
    diffusion,
    validate_requests,
)
from generation.backends.diffusion import DiffusersControlNetBackend, ModelWeightsNotFoundError
from generation.prompts import DEFAULT_NEGATIVE_PROMPT, PromptTemplate, prompt_for


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyDiffusers:
    """A tiny random SD 1.5 folder and ControlNet folder in save_pretrained layout, built once."""
    return build_tiny_diffusers(tmp_path_factory.mktemp("tiny_diffusers"))


@pytest.fixture(scope="module")
def backend(tiny_diffusers_dir: TinyDiffusers):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = DiffusersControlNetBackend(
            str(tiny_diffusers_dir.base),
            str(tiny_diffusers_dir.controlnet),
            num_inference_steps=2,
            device="cpu",
            batch_size=4,
        )
    with loaded:
        yield loaded


def square_condition(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    """(size, size, 3) uint8 Canny-like condition: the outline of a square."""
    cond = np.zeros((size, size, 3), np.uint8)
    cond[lo, lo:hi] = cond[hi - 1, lo:hi] = 255
    cond[lo:hi, lo] = cond[lo:hi, hi - 1] = 255
    return cond


def request(seed: int, cond: np.ndarray | None = None, category: str = "dog") -> GenerationRequest:
    prompt, negative = prompt_for(category)
    return GenerationRequest(
        image_id=f"img{seed}",
        seed=seed,
        prompt=prompt,
        negative_prompt=negative,
        condition=square_condition() if cond is None else cond,
        render=None,
        category=category,
    )


def test_output_shape_dtype_and_variation(backend: DiffusersControlNetBackend) -> None:
    (image,) = backend.generate([request(0)])
    assert image.shape == (64, 64, 3)
    assert image.dtype == np.uint8
    assert image.std() > 1.0  # a picture, not a constant fill


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_same_seed_same_image_different_seed_differs(backend: DiffusersControlNetBackend) -> None:
    first = backend.generate([request(7)])[0]
    np.testing.assert_array_equal(first, backend.generate([request(7)])[0])
    pair = backend.generate([request(7), request(8)])
    np.testing.assert_array_equal(pair[1], backend.generate([request(7), request(8)])[1])
    other = pair[1]
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 2.0
    # Inside one batch the same seed gives the same picture up to float rounding of batched kernels.
    twins = backend.generate([request(7), request(7)])
    assert max_abs_diff(twins[0], twins[1]) <= 2


def test_batch_equals_single_calls(backend: DiffusersControlNetBackend) -> None:
    reqs = [request(seed, category=name) for seed, name in [(11, "dog"), (12, "cat"), (13, "polar_bear")]]
    batched = backend.generate(reqs)
    singles = [backend.generate([r])[0] for r in reqs]
    for b, s in zip(batched, singles, strict=True):
        assert max_abs_diff(b, s) <= 2


def test_mixed_sizes_keep_order_and_size(backend: DiffusersControlNetBackend) -> None:
    big = square_condition(128, 32, 96)
    reqs = [request(1), request(2, big), request(3)]
    images = backend.generate(reqs)
    assert [im.shape for im in images] == [(64, 64, 3), (128, 128, 3), (64, 64, 3)]
    assert max_abs_diff(images[2], backend.generate([request(3)])[0]) <= 2
    assert max_abs_diff(images[1], backend.generate([request(2, big)])[0]) <= 2


def test_generate_async_returns_future(backend: DiffusersControlNetBackend) -> None:
    future = backend.generate_async([request(5), request(6)])
    assert isinstance(future, Future)
    queued = backend.generate_async([request(5), request(6)])  # runs after the first, same worker
    first, second = future.result(timeout=60), queued.result(timeout=60)
    assert len(first) == 2
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert max_abs_diff(first[0], backend.generate([request(5)])[0]) <= 2


def test_invalid_requests_fail_at_submission(backend: DiffusersControlNetBackend) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        backend.generate_async([request(0, np.zeros((60, 64, 3), np.uint8))])
    with pytest.raises(ValueError, match="uint8"):
        validate_requests([request(0, np.zeros((64, 64, 3), np.float32))])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        validate_requests([request(0, np.zeros((64, 64), np.uint8))])


def test_describe_records_settings(backend: DiffusersControlNetBackend, tiny_diffusers_dir) -> None:
    info = backend.describe()
    assert info["backend"] == "diffusers"
    assert info["base_model_path"] == str(tiny_diffusers_dir.base.resolve())
    assert info["controlnet_model_path"] == str(tiny_diffusers_dir.controlnet.resolve())
    assert info["base_model_from"] == info["controlnet_model_from"] == "local"
    assert info["scheduler"] == "DDIMScheduler"
    assert (info["num_inference_steps"], info["guidance_scale"], info["eta"]) == (2, 9.0, 1.0)
    assert info["controlnet_conditioning_scale"] == 1.0
    assert (info["device"], info["dtype"], info["batch_size"]) == ("cpu", "float32", 4)
    json.dumps(info)  # recorded in batch.json, so it must serialise
    assert backend.preferred_batch_size == 4


def test_dtype_override_is_applied(tiny_diffusers_dir: TinyDiffusers) -> None:
    with DiffusersControlNetBackend(
        str(tiny_diffusers_dir.base),
        str(tiny_diffusers_dir.controlnet),
        num_inference_steps=2,
        device="cpu",
        dtype="bfloat16",
    ) as low:
        assert low.describe()["dtype"] == "bfloat16"
        image = low.generate([request(0)])[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    with pytest.raises(ValueError, match="dtype"):
        DiffusersControlNetBackend(str(tiny_diffusers_dir.base), device="cpu", dtype="int8")


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to load weights fail the test: errors must come before loading starts."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the missing model was reported")

    monkeypatch.setattr(diffusion.ControlNetModel, "from_pretrained", forbidden)
    monkeypatch.setattr(diffusion.StableDiffusionControlNetPipeline, "from_pretrained", forbidden)


def test_missing_local_folder_is_reported_before_work(tmp_path: Path, tiny_diffusers_dir, no_loading) -> None:
    missing = tmp_path / "no_such_sd15"
    with pytest.raises(ModelWeightsNotFoundError, match="save_pretrained") as err:
        DiffusersControlNetBackend(str(missing), str(tiny_diffusers_dir.controlnet), device="cpu")
    assert str(missing) in str(err.value)
    missing_cn = tmp_path / "no_such_controlnet"
    with pytest.raises(ModelWeightsNotFoundError, match="ControlNet") as err:
        DiffusersControlNetBackend(str(tiny_diffusers_dir.base), str(missing_cn), device="cpu")
    assert str(missing_cn) in str(err.value)


def test_folder_in_wrong_layout_is_reported(tmp_path: Path, tiny_diffusers_dir, no_loading) -> None:
    with pytest.raises(ModelWeightsNotFoundError, match=r"model_index\.json"):
        DiffusersControlNetBackend(str(tmp_path), str(tiny_diffusers_dir.controlnet), device="cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    with pytest.raises(ModelWeightsNotFoundError, match="unet"):
        DiffusersControlNetBackend(str(partial), str(tiny_diffusers_dir.controlnet), device="cpu")


def test_uncached_repo_id_is_reported(tmp_path: Path, tiny_diffusers_dir, no_loading) -> None:
    with pytest.raises(ModelWeightsNotFoundError, match="Hugging Face cache") as err:
        DiffusersControlNetBackend(
            "nobody/not-a-model", str(tiny_diffusers_dir.controlnet), device="cpu", cache_dir=str(tmp_path)
        )
    assert "nobody/not-a-model" in str(err.value) and str(tmp_path) in str(err.value)


def test_loads_repo_ids_from_offline_hf_cache(
    tmp_path: Path, tiny_diffusers_dir, backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    install_in_hf_cache(tiny_diffusers_dir.base, tmp_path, "tiny/sd15")
    install_in_hf_cache(tiny_diffusers_dir.controlnet, tmp_path, "tiny/canny")
    built = build_backend(
        "diffusers",
        base_model="tiny/sd15",
        controlnet_model="tiny/canny",
        cache_dir=str(tmp_path),
        num_inference_steps=2,
        device="cpu",
    )
    with built:
        assert isinstance(built, DiffusersControlNetBackend)
        info = built.describe()
        assert (info["base_model"], info["base_model_from"]) == ("tiny/sd15", "hf-cache")
        assert info["controlnet_model_from"] == "hf-cache"
        np.testing.assert_array_equal(built.generate([request(4)])[0], backend.generate([request(4)])[0])


def test_registry_names() -> None:
    assert {"diffusers", "render"} <= set(available_backends())
    with pytest.raises(ValueError, match="unknown generation backend"):
        build_backend("no-such-backend")


def test_prompt_template() -> None:
    prompt, negative = prompt_for("polar_bear")
    assert prompt == "An image of polar bear, best quality, extremely detailed"
    assert negative == DEFAULT_NEGATIVE_PROMPT
    assert negative.startswith("longbody, lowres") and negative.endswith("worst quality, low quality")
    assert prompt_for("cat", "a photo of a {class}") == ("a photo of a cat", DEFAULT_NEGATIVE_PROMPT)
    custom = PromptTemplate(template="{class} in a field", negative_prompt="blurry")
    assert custom.format("horse") == ("horse in a field", "blurry")
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate(template="An image of an animal")
