"""The three-stage style encoder (arXiv 2510.01347) on SD 1.x: every default a run reads.

Each stage is one run in <workdir>/stage<k>; stage 2 reads stage 1's vectors from
<workdir>/stage1, stage 3 starts from stage 2's encoder in <workdir>/stage2:
    python launch/train_style_encoder.py --config configs/style_encoder.py --workdir W \
        --config.stage=1 --config.data.source=folder --config.data.path=STYLE_IMAGES \
        --config.style.tower_path=CLIP_VIT_L14_FOLDER
    ... --config.stage=2, then --config.stage=3 (same flags)
then sample from one reference image:
    python launch/sample.py --config configs/style_encoder.py --workdir W \
        --style_image REF.png --prompt "a house" --out /tmp/styled
The tiny variant (random models, CPU, minutes) is configs/style_encoder_tiny.py.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    base = default.get_config()
    config = ml_collections.ConfigDict()
    config.seed = 0  # Model init, bank init, data order, noise: one seed for every stage.
    config.stage = 1  # Which stage this run trains: 1, 2 or 3.
    config.model = base.model  # The frozen SD 1.x (`configs/default.py` documents each field).
    config.model.pretrained = "CompVis/stable-diffusion-v1-4"  # The paper's base; any SD 1.x.
    config.data = base.data  # Style images with content-only captions (`data.source`, ...).

    config.style = ml_collections.ConfigDict()
    config.style.num_tokens = 8  # n: style vectors per image (the paper's 8).
    config.style.placeholder = "sks"  # The word the vectors replace (one token in SD's CLIP).
    config.style.prompt_template = "{caption}, in the style of {style}."  # Training prompt.
    config.style.init_std = 0.02  # Stage 1: the bank starts N(0, init_std²).
    config.style.head = "linear"  # "linear" (pooled output -> n·D) or "slice" (the ablation).
    config.style.tower = "pretrained"  # Image tower: "pretrained" (tower_path) or "tiny".
    config.style.tower_path = ""  # HF folder of CLIP ViT-L/14 (CLIPModel or CLIPVisionModel).
    config.style.tiny_tower = ml_collections.ConfigDict()  # tower="tiny": a random small ViT.
    config.style.tiny_tower.hidden = 32  # Width.
    config.style.tiny_tower.layers = 2  # Transformer layers.
    config.style.tiny_tower.heads = 4  # Attention heads.
    config.style.tiny_tower.image_size = 32  # Input side in pixels.
    config.style.tiny_tower.patch_size = 8  # Patch side in pixels.

    config.stage1 = _stage(learning_rate=1e-3, batch_size=8)
    config.stage1.steps_per_batch = 200  # Steps on each batch of images before the next.
    config.stage2 = _stage(learning_rate=1e-4, batch_size=8)
    config.stage2.epochs = 10  # Passes over the images.
    config.stage3 = _stage(learning_rate=2e-4, batch_size=8, schedule="cosine")
    config.stage3.epochs = 5  # Passes over the images; the cosine reaches 0 at the end.

    config.sample = base.sample  # launch/sample.py's settings (`configs/default.py`).
    config.sample.style_guidance = 0.0  # s_s of dual guidance; 0 = plain CFG on the styled prompt.
    config.sample.style_size = 0  # Reference images resized to this side first; 0: tower's.
    config.mesh = base.mesh  # (data, fsdp) mesh.
    config.checkpoint = base.checkpoint  # Saves, kept checkpoints, restore step.
    config.checkpoint.every = 500
    config.log = base.log  # Metric interval.
    return config


def _stage(learning_rate: float, batch_size: int, schedule: str = "constant"):
    """One stage's batch and optimizer (AdamW, eps 1e-8, weight decay 0.01 in all three)."""
    stage = ml_collections.ConfigDict()
    stage.batch_size = batch_size  # Global batch.
    stage.optim = default.get_config().optim  # The trainer's optimizer group.
    stage.optim.learning_rate = learning_rate  # Peak learning rate.
    stage.optim.schedule = schedule  # "constant" or "cosine" (to final_lr_fraction = 0).
    return stage
