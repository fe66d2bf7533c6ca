"""Samples images from the base model for prompts, writing PNGs and a labelled grid.

Prompts come from --prompt (repeatable), --prompts_file (one per line) or --split (the
captions of that data split through sample.prompt_template, the evaluation protocol).

    python launch/sample.py --config configs/demo.py --out /tmp/samples \
        --prompt "a red circle" --prompt "a blue square" --num_per_prompt 2
    python launch/sample.py --config configs/monet.py --out /tmp/monet-eval --split testA
"""

from absl import app, flags, logging
from ml_collections import config_flags

from nsync_jax import sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the PNGs, prompts.jsonl and grid.png.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for more.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file, one prompt per line.")
_SPLIT = flags.DEFINE_string("split", None, "Use this data split's captions as prompts.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        with open(_PROMPTS_FILE.value) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if _SPLIT.value:
        prompts += sampling.split_prompts(_CONFIG.value, _SPLIT.value)
    if not prompts:
        raise app.UsageError("give --prompt, --prompts_file or --split")
    paths = sampling.sample_to_dir(_CONFIG.value, prompts, _OUT.value, _NUM_PER_PROMPT.value)
    logging.info("wrote %d images and grid.png to %s", len(paths), _OUT.value)


if __name__ == "__main__":
    app.run(main)
