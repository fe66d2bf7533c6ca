"""Our Flax model layer: UNet, VAE, CLIP text and vision, schedules and samplers.

`stable_diffusion.py` holds the `StableDiffusion` bundle and the tiny/random builders;
`models.X` reads its names.
"""

import importlib
import os


def __getattr__(name: str):
    # Lazily, so `nsync_jax.models.layers` and friends import without the bundle.
    submodule = os.path.join(os.path.dirname(__file__), name + ".py")
    if name.startswith("_") or os.path.exists(submodule):
        raise AttributeError(name)  # A submodule: the import system loads it.
    return getattr(importlib.import_module("nsync_jax.models.stable_diffusion"), name)
