"""Writes a trained style encoder for PyTorch: a transformers `CLIPVisionModel` folder and
the projection as safetensors (docs/style_encoder.md has the snippet that loads them).

python launch/export_style_encoder.py --workdir /tmp/style-tiny --output /tmp/style-export
"""

from absl import flags, logging

from nsync_jax import cli
from nsync_jax.style_encoder import generate

_WORKDIR = flags.DEFINE_string("workdir", None, "The style encoder's runs (stage2/, stage3/).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write.")
_STAGE = flags.DEFINE_integer("stage", None, "2 or 3; default: 3 if it ran, else 2.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    del argv
    written = generate.export_run(_WORKDIR.value, _OUTPUT.value, _STAGE.value)
    logging.info("wrote %s", ", ".join(f"{k}: {v}" for k, v in written.items()))


if __name__ == "__main__":
    cli.run(main)
