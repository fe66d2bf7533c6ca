"""Runs a `launch/*.py` script inside the test process, as `python launch/<script>.py
--flag=value ...` runs it: the same file, its flag definitions, `cli.run`'s flag parsing,
logging and error handling, and its exit status.

A subprocess pays for importing JAX, torch and the model libraries and for starting JAX
every time; in process they are paid once per test session. Each launch script is a thin
layer of flags over one library call, so this reaches everything a user's command does
except the interpreter start-up, which each script's subprocess smoke test covers
(tests/test_cli.py).

Every run gets the absl flags of its own script only: the flags an earlier run's script
defined (absl names their module by the script's path) and the `--config.` fields
ml_collections added are removed first, and every other flag is reset to its default.
Flags that libraries define when a script first imports them stay, as in a process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import runpy
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Result:
    """What a subprocess run would give: exit status and stderr (errors and log lines)."""

    returncode: int
    stderr: str


class _LogLines(logging.Handler):
    """Log records as lines of `stream`. Not a `logging.StreamHandler`: absl's first
    `app.run` removes those that write to `sys.stderr`, which is `stream` by then."""

    def __init__(self, stream: io.StringIO):
        super().__init__()
        self.stream = stream
        self.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")


def _forget_script_flags() -> None:
    by_module = flags.FLAGS.flags_by_module_dict()
    names = {
        flag.name
        for module, defined in by_module.items()
        if module.startswith("launch/")
        for flag in defined
    }
    names |= {n for n in flags.FLAGS if n == "config" or n.startswith("config.")}
    for name in names:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def run(script: str, values: dict, expect: int | None = 0) -> Result:
    """Runs `launch/<script>.py --k=v ...` (cwd: the repository, as the README's commands).

    Args:
      script: the launch script's name, without `.py`.
      values: {flag: value}; a value may be a list, giving the flag once per item.
      expect: the exit status to assert (None: no check).

    Returns:
      The exit status and what the script wrote to stderr, its log lines included.
    """
    argv = [f"launch/{script}.py"]
    for key, value in values.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            argv.append(f"--{key}={item}")
    stream = io.StringIO()
    handler = _LogLines(stream)
    root = logging.getLogger()
    level = root.level
    _forget_script_flags()
    saved_argv, cwd = sys.argv, os.getcwd()
    root.addHandler(handler)
    try:
        os.chdir(REPO)
        sys.argv = argv
        with contextlib.redirect_stderr(stream):
            runpy.run_path(argv[0], run_name="__main__")
        code = 0  # `cli.run` always exits; a script that returns is a success too.
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.chdir(cwd)
        root.removeHandler(handler)
        root.setLevel(level)
        _forget_script_flags()
    result = Result(code, stream.getvalue())
    if expect is not None:
        assert code == expect, f"{' '.join(argv)} exited {code}:\n{result.stderr[-4000:]}"
    return result
