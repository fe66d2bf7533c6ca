"""The demo: a tiny random-init Stable Diffusion learns a made-up style on CPU in minutes.

Positives are coloured shapes in a "painterly" rendering, negatives the same shapes plain,
all made in-process (no files, no downloads). Run:
    python launch/train.py --config configs/demo.py --workdir /tmp/nsync-demo
and the baseline with --config.train.mode=finetune.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.source = "tiny"
    config.model.resolution = 32
    config.train.scope = "unet"
    config.train.num_steps = 300
    config.train.batch_size = 8
    config.log.every = 25
    config.sample.every = 100  # Pictures of the run while it learns: WORKDIR/samples/.
    return config
