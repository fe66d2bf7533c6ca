"""Samples images from a run's checkpoint (--workdir) or the base model, writing PNGs and a
labelled grid.

Prompts come from --prompt (repeatable), --prompts_file (one per line) or --split (the
captions of that data split through sample.prompt_template, the evaluation protocol).

    python launch/sample.py --config configs/demo.py --out /tmp/samples \
        --prompt "a red circle" --prompt "a blue square" --num_per_prompt 2
    python launch/sample.py --config configs/monet.py --out /tmp/monet-eval --split testA
    python launch/sample.py --config configs/demo.py --workdir /tmp/nsync-demo --out /tmp/s \
        --prompt "a red circle in the style of <s*>"

With --style_image (a reference image or a folder of them) --workdir is a style-encoder
run (launch/train_style_encoder.py): its stage-3 encoder (stage 2 if stage 3 has not run)
turns each reference into style tokens, and each --prompt is content only ("a house"):

    python launch/sample.py --config configs/style_encoder.py --workdir /tmp/style \
        --style_image ref.png --prompt "a house" --out /tmp/styled \
        --config.sample.style_guidance=1.0

With --workdir the model is the run's (its saved config, scope and trained parameters at
--step, the newest by default; their EMA if the run kept one, unless --weights=raw);
--config then supplies only the `sample` settings.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from nsync_jax import cli, runs, sampling
from nsync_jax.style_encoder import generate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the PNGs, prompts.jsonl and grid.png.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for more.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file, one prompt per line.")
_SPLIT = flags.DEFINE_string("split", None, "Use this data split's captions as prompts.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run to sample from.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir; newest if unset.")
_WEIGHTS = flags.DEFINE_enum(
    "weights", None, ["ema", "raw"], "--workdir's EMA or raw weights; default: ema if it has one."
)
_STYLE_IMAGE = flags.DEFINE_string(
    "style_image", None, "A reference image (or folder): sample a style-encoder --workdir."
)
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        with open(_PROMPTS_FILE.value) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if _SPLIT.value:
        prompts += sampling.split_prompts(_CONFIG.value, _SPLIT.value)
    if not prompts:
        raise app.UsageError("give --prompt, --prompts_file or --split")
    if _STYLE_IMAGE.value:
        if not _WORKDIR.value:
            raise app.UsageError("--style_image needs --workdir: a style-encoder run")
        style_run = generate.load_style_run(_WORKDIR.value)
        logging.info("style encoder of stage %d, step %d", style_run.stage, style_run.step)
        paths = generate.sample_to_dir(
            _CONFIG.value.sample,
            style_run,
            generate.style_image_paths(_STYLE_IMAGE.value),
            prompts,
            _OUT.value,
            _NUM_PER_PROMPT.value,
        )
        logging.info("wrote %d images and grid.png to %s", len(paths), _OUT.value)
        return
    model_and_params = None
    if _WORKDIR.value:
        ema = None if _WEIGHTS.value is None else _WEIGHTS.value == "ema"
        run = runs.load_trained(_WORKDIR.value, _STEP.value, ema=ema)
        model_and_params = (run.model, run.params)
        logging.info(
            "sampling step %d of %s (%s weights)",
            run.step,
            _WORKDIR.value,
            "EMA" if run.ema else "raw",
        )
    paths = sampling.sample_to_dir(
        _CONFIG.value, prompts, _OUT.value, _NUM_PER_PROMPT.value, model_and_params
    )
    logging.info("wrote %d images and grid.png to %s", len(paths), _OUT.value)


if __name__ == "__main__":
    cli.run(main)
