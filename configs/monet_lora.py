"""Monet with LoRA on SD 1.5's UNet attention, under NSYNC (the paper's untested LoRA case).

Defaults as diffusers' train_text_to_image_lora.py: rank 4 with alpha = rank on to_q, to_k,
to_v, to_out.0, A ~ N(0, 1/r), AdamW lr 1e-4, weight decay 1e-2, constant LR; the frozen
base in bfloat16. Data, negatives, prompts, batch 2 per branch and 8000 steps as the
reference NSYNC run (configs/monet.py). Run:
    python launch/train.py --config configs/monet_lora.py --workdir /tmp/nsync-monet-lora
Pivotal tuning (LoRA plus a new token, both trained and exported):
    python launch/train.py --config configs/monet_lora.py --config.train.scope=lora_ti \\
        --workdir /tmp/nsync-monet-pivotal
Export writes pytorch_lora_weights.safetensors for diffusers' `pipe.load_lora_weights`:
    python launch/export.py --workdir /tmp/nsync-monet-lora --output /tmp/monet-lora
"""

from configs import monet


def get_config():
    config = monet.get_config()
    config.train.scope = "lora"
    config.lora.rank = 4
    config.lora.alpha = 4.0
    config.lora.unet_targets = "attention"
    config.lora.text_targets = ""
    config.lora.base_dtype = "bfloat16"
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 1e-2
    return config
