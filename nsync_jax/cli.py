"""What every launch script does around its one library call: logging, flags and errors.

    from nsync_jax import cli

    def main(argv): ...

    if __name__ == "__main__":
        cli.run(main)

- Many hosts: `hosts.initialize` runs first, from the flags below (or
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); a single process
  passes none and nothing starts. `--multihost` uses JAX's auto-detection (TPU pod
  slices, SLURM, Open MPI); `--coordinator=HOST:PORT --num_processes=N --process_id=I`
  names everything (GPU nodes without a cluster manager). README "Many hosts".
- Logging: absl at INFO, with other libraries' noise dropped: JAX's INFO line for each
  backend it probes and cannot start ("Unable to initialize backend 'tpu'") and orbax's
  per-save INFO lines.
- Flags: a mistyped config field (`--config.data.paht=x`) or a `--config` file that cannot
  be loaded is one line naming it.
- Errors: an `errors.UserError` (a config that cannot work, a missing file or data set, a
  checkpoint that cannot be resumed) is printed as one line `error: ...` and the script
  exits with status 2; Ctrl-C outside the training loop (which saves first, see
  `loop.PreemptionWatcher`) exits with 130. Any other exception is a bug and keeps
  its traceback. `NSYNC_TRACEBACK=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from nsync_jax import errors, hosts

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130

_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Start JAX on many hosts with its cluster auto-detection (TPU pod slices, SLURM, "
    "Open MPI); run the same command on every host.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "HOST:PORT of process 0 (many hosts without a cluster manager)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "How many processes in all (with --coordinator)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 to num_processes - 1 (with --coordinator)."
)
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout",
    hosts.DEFAULT_TIMEOUT_S,
    "Seconds to wait for the coordinator, every process, and their start-up checks.",
)


def setup_logging() -> None:
    """absl logging at INFO, without the libraries' INFO noise (see the module docstring)."""
    absl_logging.set_verbosity(absl_logging.INFO)
    quiet_library_logs()


def quiet_library_logs() -> None:
    """Only the filters of `setup_logging`, for programs that keep their own verbosity
    (the benchmarks): library modules install no filters when imported."""
    from nsync_jax import checkpoint  # A heavy import; every launch script needs it.

    # JAX logs at INFO every platform it tries and fails to start; the chosen one is logged
    # by us (the mesh), and a real failure to start the requested platform still raises.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    checkpoint.quiet_orbax_logs()


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _show_tracebacks() -> bool:
    return os.environ.get("NSYNC_TRACEBACK", "") not in ("", "0")


def _flag_error_text(error: Exception) -> str:
    """ml_collections' message, unwrapped: an unknown field arrives as an AttributeError
    around a KeyError whose text is "'paht'\\nDid you mean "path" instead of "paht"?"."""
    while len(error.args) == 1 and isinstance(error.args[0], Exception):
        error = error.args[0]
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    field, newline, hint = text.partition("\n")
    if isinstance(error, KeyError):
        return f"no config field {field}" + (f". {hint}" if newline else "")
    return " ".join(text.split())


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config-field mistakes reported in one line.

    ml_collections raises AttributeError (with a "Did you mean" hint) for an unknown field
    and TypeError/ValueError for a value of the wrong type, all outside absl's own
    `flags.Error` handling, so they would otherwise end in a traceback.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if _show_tracebacks():
            raise
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        _fail(f"bad config flag: {_flag_error_text(e)} (flags given: {overrides})", 2)
        raise  # Unreachable: _fail exits.


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with this module's logging, flag and error handling."""

    def wrapped(argv: list[str]) -> None:
        setup_logging()
        try:
            hosts.initialize(
                _COORDINATOR.value,
                _NUM_PROCESSES.value,
                _PROCESS_ID.value,
                auto=_MULTIHOST.value,
                timeout_s=_COORDINATOR_TIMEOUT.value,
            )
            main(argv)
        except errors.UserError as e:
            if _show_tracebacks():
                raise
            _fail(str(e), USER_ERROR_STATUS)
        except OSError as e:
            # ml_collections reports a config file it could not load only when the config
            # is first used, as an OSError whose last line names the file and the reason.
            if "Failed loading config file" not in str(e) or _show_tracebacks():
                raise
            reason = str(e).strip().splitlines()[-1].strip()
            _fail(f"cannot load the --config file: {reason}", USER_ERROR_STATUS)
        except KeyboardInterrupt:
            if _show_tracebacks():
                raise
            _fail("interrupted", INTERRUPTED_STATUS)

    app.run(wrapped, flags_parser=_parse_flags)
