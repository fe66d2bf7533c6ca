"""Writes WORKDIR/report.html: a run's metric curves, sample grids over steps and config,
in one file to open or share.

python launch/report.py --workdir /tmp/nsync-demo
"""

from absl import flags, logging

from nsync_jax import cli, report

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.info("wrote %s", report.write_report(_WORKDIR.value))


if __name__ == "__main__":
    cli.run(main)
