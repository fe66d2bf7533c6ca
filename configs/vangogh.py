"""Van Gogh (CycleGAN vangogh2photo trainA, 400 images) with the monet reference settings.

python launch/train.py --config configs/vangogh.py --workdir /tmp/nsync-vangogh
"""

from configs import monet


def get_config():
    config = monet.get_config()
    config.data.tfds_name = "cycle_gan/vangogh2photo"
    config.train.style_token = "<vangogh>"
    return config
