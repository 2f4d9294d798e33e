"""Test helper: a tiny random Stable Diffusion 1.5 + ControlNet pipeline, saved like the real ones.

`build_tiny_diffusers(root)` writes two folders in save_pretrained layout:
- `root/sd15`: a StableDiffusionPipeline (unet, vae, text_encoder, tokenizer, scheduler; no safety
  checker), the layout of "runwayml/stable-diffusion-v1-5";
- `root/controlnet`: a ControlNetModel, the layout of "lllyasviel/control_v11p_sd15_canny".
Component sizes follow REFERENCE.md section 7 (block_out_channels (4, 8), cross_attention_dim 32, ...),
so 64 x 64 px images with 2 steps take well under a second on a CPU. The VAE has two blocks, so latents
are 1/2 of the image size (1/8 in SD 1.5), and the ControlNet's condition embedding downsamples by 2 to
match. `install_in_hf_cache` copies a folder into a Hugging Face hub cache layout, to test loading by
repo id offline. The tokenizer is a toy byte-pair vocabulary written here (25 tokens).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_ATTENTION_DIM = 32
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<unk>")
TOY_LETTERS = "adegimno"
# Each merge joins two vocabulary entries into one that is in the vocabulary too ("imag" + "e</w>").
TOY_MERGES = (("i", "m"), ("a", "g"), ("a", "n</w>"), ("o", "g</w>"), ("im", "ag"), ("imag", "e</w>"))


@dataclass(frozen=True)
class TinyDiffusers:
    """Folders of a saved tiny pipeline: `base` (StableDiffusionPipeline) and `controlnet`."""

    base: Path
    controlnet: Path


def write_toy_tokenizer_files(folder: Path) -> Path:
    """Write a CLIP BPE vocab.json (25 tokens) and merges.txt into `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [*SPECIAL_TOKENS, *TOY_LETTERS, *(f"{c}</w>" for c in TOY_LETTERS)]
    tokens += ["".join(pair) for pair in TOY_MERGES]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1))
    merges = ["#version: 0.2", *(" ".join(pair) for pair in TOY_MERGES)]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return folder


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer over the toy vocabulary (written into `folder`), model_max_length 77."""
    write_toy_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(
        folder, model_max_length=77, unk_token="<unk>", local_files_only=True
    )


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=1,
    )


def tiny_controlnet() -> ControlNetModel:
    return ControlNetModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=1,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
    )
    return CLIPTextModel(config)


def build_tiny_diffusers(root: Path, seed: int = 0) -> TinyDiffusers:
    """Build random tiny components (torch seed `seed`) and save them under `root`."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(root / "toy_tokenizer")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    base = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    paths = TinyDiffusers(base=root / "sd15", controlnet=root / "controlnet")
    base.save_pretrained(paths.base)
    tiny_controlnet().save_pretrained(paths.controlnet)
    return paths


def install_in_hf_cache(folder: Path, cache_dir: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Copy `folder` into `cache_dir` laid out as the hub cache holds `repo_id` at `commit`.

    Returns the snapshot folder. Plain copies stand in for the cache's blob symlinks.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
