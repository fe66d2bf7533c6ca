"""Monet (CycleGAN monet2photo trainA) with the NSYNC reference hyperparameters on SD 1.5.

Textual inversion of one token, batch 2 per branch, AdamW 1e-3, weight decay 1e-2,
constant LR, 8000 steps, 512 px, random flips, no clipping (METHOD.md). The data must be
prepared once (needs TensorFlow and network; see docs/data.md):
    tfds build cycle_gan/monet2photo --file_format=array_record --data_dir=$TFDS_DATA_DIR
Run:
    python launch/train.py --config configs/monet.py --workdir /tmp/nsync-monet
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.source = "pretrained"
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    config.model.compute_dtype = "bfloat16"
    config.data.source = "tfds"
    config.data.tfds_name = "cycle_gan/monet2photo"
    config.data.split = "trainA"  # The style side: 1072 paintings (testA: 121).
    config.data.tfds_data_dir = ""  # Where `tfds build ... --file_format=array_record` wrote.
    config.data.captions_file = ""  # VLM captions keyed by "trainA-00000"...; "" = template.
    config.data.caption_template = "a painting"
    config.data.cache_latents = True  # VAE frozen under textual inversion: encode once.
    config.negatives.source = "store"
    config.train.scope = "textual_inversion"
    config.train.style_token = "<monet>"
    config.train.initializer_token = "painting"
    config.train.num_steps = 8000
    config.train.batch_size = 2
    # A frozen UNet with a backward pass to the token: 11.5 GiB per device at one image per
    # branch per device (benchmarks/memory.py, docs/scale.md), so no remat on a v4 chip.
    # The reference batch of 2 runs on 1 or 2 devices; on a v4-8 set batch_size=4.
    config.model.attention = "xla"
    config.model.remat = "none"
    config.train.grad_accum = 1
    return config
