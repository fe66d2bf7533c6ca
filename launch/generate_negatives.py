"""Generates NSYNC's negatives with the frozen base model into a store folder.

One image per training caption (negatives.per_example), prompt "{caption} in the style of
painting", 50 PNDM steps, guidance 7.5, saved at 256 px. Rerun to resume; the store's
settings must match (they are recorded once the model has loaded). Every positive is
decoded first: a bad one stops the run, or with --config.data.on_bad_image=skip gets no
negative. Then train with --config.negatives.source=store and the same path.

    python launch/generate_negatives.py --config configs/monet.py \
        --config.negatives.path=/data/monet-negatives
    python launch/generate_negatives.py --config configs/demo.py \
        --config.negatives.path=/tmp/demo-negatives --config.negatives.size=0 \
        --config.negatives.num_steps=10 --config.negatives.scheduler=ddim
"""

from absl import flags, logging
from ml_collections import config_flags

from nsync_jax import cli, negatives

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", None, "Stop after this many new images (the store stays resumable)."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    result = negatives.generate_store(_CONFIG.value, max_images=_MAX_IMAGES.value)
    logging.info(
        "negatives store %s: %d generated now, %s (%d images expected; %d positives "
        "undecodable, skipped)",
        result.path,
        result.generated,
        "complete" if result.complete else "incomplete: rerun to finish",
        result.total,
        result.bad_positives,
    )


if __name__ == "__main__":
    cli.run(main)
