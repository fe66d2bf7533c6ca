"""Loading pretrained Stable Diffusion weights into the Flax modules of `models.py`."""

from __future__ import annotations

import ml_collections


def load_pretrained(model_config: ml_collections.ConfigDict):
    """Loads UNet, VAE, text encoder, tokenizer and scheduler config from a diffusers folder."""
    raise NotImplementedError(
        "model.source='pretrained' needs the Stable Diffusion weight loader, which is not "
        f"written yet (tracked in the real-data issue); cannot load {model_config.pretrained!r}. "
        "Use model.source='tiny' (configs/demo.py) meanwhile."
    )
