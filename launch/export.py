"""Exports a trained run as a PyTorch diffusers pipeline folder.

    python launch/export.py --workdir /tmp/nsync-demo --output /tmp/nsync-demo-pipeline
    python launch/export.py --workdir W --step 4000 --output DIR --dtype float16
    python launch/export.py --workdir W --output DIR --weights=raw   # not the EMA

Rebuilds the model from the run's saved config (or --config), restores the trainable
parameters of checkpoint --step (the newest by default; their EMA if the run kept one,
unless --weights=raw) and writes DIR, which
`diffusers.StableDiffusionPipeline.from_pretrained(DIR)` loads; a textual-inversion run
also writes DIR/learned_embeds.safetensors for `pipe.load_textual_inversion(DIR)`.
"""

from absl import flags
from ml_collections import config_flags

from nsync_jax import cli, export

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file; default: the run's saved config.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default the newest.")
_OUTPUT = flags.DEFINE_string("output", None, "Pipeline folder to write (new or empty).")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", sorted(export.TORCH_DTYPES), "Dtype of the converted weights."
)
_WEIGHTS = flags.DEFINE_enum(
    "weights", None, ["ema", "raw"], "The EMA or the raw weights; default: ema if the run has one."
)
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    del argv
    export.export_run(
        _WORKDIR.value,
        _OUTPUT.value,
        _STEP.value,
        _CONFIG.value,
        torch_dtype=_DTYPE.value,
        ema=None if _WEIGHTS.value is None else _WEIGHTS.value == "ema",
    )


if __name__ == "__main__":
    cli.run(main)
