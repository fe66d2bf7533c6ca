"""Published Stable Diffusion UNet and CLIP-text architectures, as plain dicts.

Shapes only, nothing downloaded: the memory report and the throughput benchmarks build
random-init models of these architectures. Both the PyTorch and the JAX benchmark import
this module, so it imports nothing (not even numpy). The keys are the fields of the
components' `config.json` (diffusers' `UNet2DConditionModel`, transformers'
`CLIPTextConfig`), so each framework builds the same network from one dict:

    diffusers.UNet2DConditionModel(**unet_config("sd15"))
    nsync_jax.models.unet.UNetConfig.from_dict(unet_config("sd15"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config("sd15")))

Fields left out take the defaults both sides share (GroupNorm(32), SiLU, eps 1e-5).

Parameter counts (random init), which match the published checkpoints:

| arch       | UNet                    | text encoder                   |
|------------|-------------------------|--------------------------------|
| `sd15`     | 859,520,964 (859.5 M)   | CLIP ViT-L/14: 123,060,480     |
| `sd2_base` | 865,910,724 (865.9 M)   | OpenCLIP ViT-H/14: 340,387,840 |

`tiny` is the demo config's tiny model (configs/default.py `model.tiny`) at latent side 8.
"""

from __future__ import annotations

_DOWN_SD = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_UP_SD = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# Token ids as the published SD text-encoder configs set them (0/2/1, not CLIP's
# 49406/49407): with eos 2 transformers pools at the argmax id, whatever the vocabulary.
_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

# The published SD VAE (stable-diffusion-v1-5 and 2-base share it): 8x downsampling.
_VAE_SD = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# Both releases train with this DDPM schedule and the epsilon target.
_SCHEDULER_SD = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

ARCHS: dict[str, dict] = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5: unet/config.json, text_encoder/config.json.
    "sd15": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": _DOWN_SD,
            "up_block_types": _UP_SD,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            # diffusers' historical misnomer: read as the number of heads (8 of width 40..160).
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
        },
        "text": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            **_TOKEN_IDS,
        },
        "vae": _VAE_SD,
        "scheduler": _SCHEDULER_SD,
        "vae_scale_factor": 8,
    },
    # stabilityai/stable-diffusion-2-base: 512 px, epsilon, OpenCLIP-H's penultimate layer
    # (hence 23 of its 24 text layers).
    "sd2_base": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": _DOWN_SD,
            "up_block_types": _UP_SD,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            # Heads per block, so that every head is 64 wide.
            "attention_head_dim": (5, 10, 20, 20),
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        },
        "text": {
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
            **_TOKEN_IDS,
        },
        "vae": _VAE_SD,
        "scheduler": _SCHEDULER_SD,
        "vae_scale_factor": 8,
    },
    # configs/default.py model.tiny; latents as if behind SD's 8x VAE (64 px -> side 8).
    "tiny": {
        "unet": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),  # Multiples of 32: GroupNorm(32).
            "layers_per_block": 1,
            "attention_head_dim": 8,
            "cross_attention_dim": 32,
        },
        "text": {
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
            **_TOKEN_IDS,
        },
        "vae": {
            **_VAE_SD,
            "block_out_channels": (32, 32, 32, 32),
            "layers_per_block": 1,
            "sample_size": 64,
        },
        "scheduler": _SCHEDULER_SD,
        "vae_scale_factor": 8,
    },
}


def _arch(arch: str) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {sorted(ARCHS)}.")
    return ARCHS[arch]


def unet_config(arch: str) -> dict:
    """The `unet/config.json` fields of `arch` (diffusers' `UNet2DConditionModel` and our
    `UNetConfig.from_dict` take them).

    Raises:
      ValueError: for an unknown `arch`.
    """
    return dict(_arch(arch)["unet"])  # Values are immutable: a shallow copy is enough.


def text_config(arch: str) -> dict:
    """Keyword arguments of transformers' `CLIPTextConfig` for `arch`'s text encoder.

    Raises:
      ValueError: for an unknown `arch`.
    """
    return dict(_arch(arch)["text"])


def vae_config(arch: str) -> dict:
    """The `vae/config.json` fields of `arch`'s VAE (`AutoencoderKL`, `VAEConfig.from_dict`)."""
    return dict(_arch(arch)["vae"])


def scheduler_config(arch: str) -> dict:
    """The training noise schedule of `arch` (a diffusers scheduler config)."""
    return dict(_arch(arch)["scheduler"])


def latent_side(arch: str, resolution: int) -> int:
    """Side of the latents of `resolution`-pixel images, checked against the UNet.

    Raises:
      ValueError: for an unknown `arch`, or a resolution the VAE or the UNet cannot take
        (every UNet down block but the last halves the side, and the up path must meet it).
    """
    spec = _arch(arch)
    factor = spec["vae_scale_factor"]
    halvings = len(spec["unet"]["block_out_channels"]) - 1
    if resolution <= 0 or resolution % (factor * 2**halvings):
        raise ValueError(
            f"{arch}: resolution {resolution} must be a positive multiple of "
            f"{factor * 2**halvings} (VAE factor {factor}, {halvings} UNet halvings)."
        )
    return resolution // factor
