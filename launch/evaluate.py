"""The NSYNC evaluation: generate "{caption} in the style of <token>" for every caption of a
split, then compare with the split's real images (CSD, CMMD, KID, FID; config.eval).

Weights come only from the paths in config.eval (nothing is downloaded):

    python launch/evaluate.py --config configs/monet.py --out /tmp/monet-eval --split testA \
        --config.eval.real_dir=/data/monet2photo/testA \
        --config.eval.csd_weights=/weights/csd_vit_l.pth \
        --config.eval.cmmd_weights=/weights/clip-vit-large-patch14-336 \
        --config.eval.inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth

A trained run: add --workdir /tmp/nsync-monet (and --step; the newest by default); its
saved config gives the model and the style token, --config the sample, data and eval
settings. Compare an existing folder instead of generating:
--config.eval.generated_dir=/tmp/samples. Metrics only, no data split:
--compare_only (eval.real_dir vs eval.generated_dir).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from nsync_jax import runs, sharding
from nsync_jax.evaluation import compare, protocol

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for generated images and metrics.json.")
_SPLIT = flags.DEFINE_string("split", "testA", "Data split whose captions and images are used.")
_COMPARE_ONLY = flags.DEFINE_bool(
    "compare_only", False, "Only compare eval.real_dir with eval.generated_dir."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run to evaluate (else the base model).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir; newest if unset.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    config = _CONFIG.value
    if _COMPARE_ONLY.value:
        mesh = sharding.make_mesh(config.mesh)
        report = compare.compare_folders(config.eval, mesh, f"{_OUT.value}/metrics.json")
    else:
        model_and_params, style_token = None, None
        if _WORKDIR.value:
            run = runs.load_trained(_WORKDIR.value, _STEP.value)
            model_and_params, style_token = (run.model, run.params), run.config.train.style_token
            logging.info("evaluating step %d of %s", run.step, _WORKDIR.value)
        report = protocol.evaluate(
            config, _OUT.value, _SPLIT.value, model_and_params, style_token=style_token
        )
    for name, value in report.items():
        logging.info("%s: %s", name, value)


if __name__ == "__main__":
    app.run(main)
