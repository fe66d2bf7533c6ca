"""Trains one stage of the style encoder (docs/style_encoder.md) in <workdir>/stage<k>.

python launch/train_style_encoder.py --config configs/style_encoder_tiny.py \
    --workdir /tmp/style-tiny --config.stage=1    # then --config.stage=2, 3
"""

from absl import flags
from ml_collections import config_flags

from nsync_jax import cli
from nsync_jax.style_encoder import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the three stages' runs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    run.train_stage(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
