"""Ukiyo-e (CycleGAN ukiyoe2photo trainA, 562 images) with the monet reference settings.

python launch/train.py --config configs/ukiyoe.py --workdir /tmp/nsync-ukiyoe
"""

from configs import monet


def get_config():
    config = monet.get_config()
    config.data.tfds_name = "cycle_gan/ukiyoe2photo"
    config.train.style_token = "<ukiyoe>"
    return config
