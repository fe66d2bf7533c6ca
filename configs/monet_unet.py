"""Monet with full-UNet NSYNC at 512 px on SD 1.5: the headline scope, sized for a TPU v4-8.

Every UNet parameter trains (859.5 M, fp32 master weights and AdamW state, FSDP-sharded
over all chips), bf16 activations, cached latents, one image per branch per chip. The
memory report (`benchmarks/memory.py`, docs/scale.md) puts this step at 13.5 GiB per
device with fsdp=8 and no remat (12.2 GiB of it temporaries; 14.1 under XLA:CPU's default
scheduler): it fits a v4 chip (32 GiB) and a v5e chip (16 GiB) without remat. On a v4-8
(4 chips) the global batch is 4 per branch. More images per chip: `train.grad_accum`
(4 micro-batches of 1: 13.2 GiB) or a memory-efficient attention (`chunked`: 4 images
per chip at 16.4 GiB, fits a v4 chip; the attention maps, not the activations of whole
blocks, set the batch-4 peak, so `model.remat=blocks` alone does not help there).
Negatives: generate the store first (README, "Negatives").
Run:
    python launch/train.py --config configs/monet_unet.py --workdir /tmp/nsync-monet-unet \
        --config.negatives.path=/path/to/store
"""

from configs import monet


def get_config():
    config = monet.get_config()
    config.train.scope = "unet"
    config.train.batch_size = 4  # Global, per branch: one per chip of a v4-8.
    config.train.grad_accum = 1  # Micro-batches per step; raise with the batch, not the memory.
    config.train.num_steps = 2000
    config.optim.learning_rate = 1e-5  # Full fine-tuning: textual inversion's 1e-3 would wreck it.
    config.optim.clip_norm = 1.0
    config.model.attention = "xla"  # "splash" on TPU, "dot_product" on NVIDIA GPUs: faster.
    config.model.remat = "none"  # Fits at one image per chip (docs/scale.md).
    config.mesh.data, config.mesh.fsdp = 1, -1  # Parameters and optimizer state over all chips.
    config.checkpoint.every = 250
    return config
