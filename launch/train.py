"""Trains a style with NSYNC (or plain fine-tuning) from a config file.

python launch/train.py --config configs/demo.py --workdir /tmp/nsync-demo
python launch/train.py --config configs/demo.py --workdir /tmp/ft --config.train.mode=finetune
"""

from absl import flags
from ml_collections import config_flags

from nsync_jax import cli, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    train.train(_CONFIG.value, _WORKDIR.value, config_file=config_file)


if __name__ == "__main__":
    cli.run(main)
