"""The style encoder's three stages on random tiny models and the demo images (CPU, minutes):
    python launch/train_style_encoder.py --config configs/style_encoder_tiny.py \
        --workdir /tmp/style-tiny --config.stage=1   (then 2, then 3)
"""

from configs import style_encoder


def get_config():
    config = style_encoder.get_config()
    config.model.source = "tiny"
    config.model.resolution = 32
    config.data.source = "demo"
    config.data.demo_count = 16
    config.style.tower = "tiny"
    config.stage1.steps_per_batch = 20
    config.stage2.epochs = 20
    config.stage3.epochs = 10
    config.checkpoint.every = 20
    config.log.every = 10
    return config
