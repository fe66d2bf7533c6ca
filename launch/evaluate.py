"""The NSYNC evaluation: generate "{caption} in the style of <token>" for every caption of a
split, then compare with the split's real images (CSD, CMMD, KID, FID; config.eval).

A trained run (its checkpoint --step, the newest by default); writes W/eval/<step>/
(metrics.json, generated/, real_vs_generated.png) and eval/<metric> TensorBoard scalars:

    python launch/evaluate.py --config configs/monet.py --workdir /tmp/nsync-monet \
        --config.eval.real_dir=/data/monet2photo/testA \
        --config.eval.csd_weights=/weights/csd_vit_l.pth \
        --config.eval.cmmd_weights=/weights/clip-vit-large-patch14-336 \
        --config.eval.inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth

Baselines (need --out): the frozen base model prompted with the artist's name,
`--style "Claude Monet"`; an exported pipeline (launch/export.py),
`--config.model.source=pretrained --config.model.pretrained=/tmp/export` (its
learned_embeds.safetensors, if any, is loaded and its token is the style).
Compare an existing folder instead of generating: --config.eval.generated_dir=/tmp/samples.
Metrics only, no data split: --compare_only (eval.real_dir vs eval.generated_dir).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from nsync_jax import cli, sharding
from nsync_jax.evaluation import compare, protocol

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string(
    "out", None, "Output folder; default <workdir>/eval/<step>; required without --workdir."
)
_SPLIT = flags.DEFINE_string("split", "testA", "Data split whose captions and images are used.")
_COMPARE_ONLY = flags.DEFINE_bool(
    "compare_only", False, "Only compare eval.real_dir with eval.generated_dir."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run to evaluate (else config.model).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir; newest if unset.")
_STYLE = flags.DEFINE_string(
    "style", None, 'Words for "{style}" in the prompt (e.g. "Claude Monet"); default the token.'
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = _CONFIG.value
    if _COMPARE_ONLY.value:
        if not _OUT.value:
            raise app.UsageError("--compare_only needs --out")
        mesh = sharding.make_mesh(config.mesh)
        report = compare.compare_folders(config.eval, mesh, f"{_OUT.value}/metrics.json")
    else:
        report = protocol.run_evaluation(
            config, _SPLIT.value, _WORKDIR.value, _STEP.value, _OUT.value, _STYLE.value
        )
    for name, value in report.items():
        logging.info("%s: %s", name, value)


if __name__ == "__main__":
    cli.run(main)
