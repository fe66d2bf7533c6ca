"""Several styles in one run: one textual-inversion token per style, SupCon over style labels.

Monet, Van Gogh and ukiyo-e (CycleGAN trainA sets, prepared as for configs/monet.py; see
docs/data.md) train together on SD 1.5, one new token each, and a label-guided supervised
contrastive term (SupCon, `nsync_jax/style_contrast.py`) pulls the x̂0 of one style
together and pushes the others away in the CLIP image space. `train.supcon_encoder` is
the CLIP ViT-L/14-336 folder the CMMD evaluation uses. NSYNC needs a negatives store
generated for this config's (prefixed) ids first:
    python launch/generate_negatives.py --config configs/multistyle.py --out /data/neg-multi
Run:
    python launch/train.py --config configs/multistyle.py --workdir /tmp/nsync-multistyle \
        --config.negatives.path=/data/neg-multi \
        --config.train.supcon_encoder=/models/clip-vit-large-patch14-336
The fine-tuning baseline: --config.train.mode=finetune; without SupCon:
--config.train.supcon_weight=0.
"""

from configs import default


def _cyclegan(name: str, token: str, label: int) -> dict:
    return {"source": "tfds", "tfds_name": f"cycle_gan/{name}", "split": "trainA",
            "token": token, "label": label}  # fmt: skip


def get_config():
    config = default.get_config()
    config.model.source = "pretrained"
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    config.model.compute_dtype = "bfloat16"
    config.data.source = "tfds"  # Each style below overrides its own source fields.
    config.data.tfds_data_dir = ""  # Where `tfds build ... --file_format=array_record` wrote.
    config.data.caption_template = "a painting"
    config.data.cache_latents = True  # VAE frozen under textual inversion: encode once.
    config.data.styles = (
        _cyclegan("monet2photo", "<monet>", 0),
        _cyclegan("vangogh2photo", "<vangogh>", 1),
        _cyclegan("ukiyoe2photo", "<ukiyoe>", 2),
    )
    config.negatives.source = "store"
    config.train.scope = "textual_inversion"  # One token per style; "lora_ti": shared LoRA too.
    config.train.initializer_token = "painting"
    config.train.num_steps = 8000
    config.train.batch_size = 8  # Several styles per batch: SupCon needs positives in it.
    config.train.supcon_weight = 0.1
    config.train.supcon_encoder = ""  # The CLIP folder of eval.cmmd_weights (required).
    config.train.supcon_views = "noise"
    return config
