"""Many processes (hosts): starting JAX's multi-controller runtime, and the start-up checks
that make a bad multi-host set-up fail at once, naming the problem, instead of hanging.

JAX runs one Python process per host (a TPU VM worker, a GPU node, a SLURM task), each
driving its local devices; `jax.distributed.initialize()` connects them through a
coordinator service that process 0 starts, after which `jax.devices()` lists every device
of every process and one `jax.jit` computation spans them all. There is no other engine:
every launch script calls `initialize` first (through `cli.run`), and then each process
runs the same program on its share of the data.

- Starting: `initialize` does nothing for one process. With `auto` it uses the
  auto-detection JAX does for TPU pod slices, SLURM and Open MPI; with a coordinator
  address (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) it starts
  those explicitly, for GPU nodes without a cluster manager. On CPU (the tests) the `gloo`
  collectives are selected first: without them, CPU computations cannot span processes.
- Checks (each a no-op for one process): `check_same_config` (every process runs the same
  config: a difference is named, not discovered as a hang in the first collective),
  `check_shared_dir` (a folder every process writes into, e.g. the workdir, is one file
  system for all), and `describe` (the one line each process logs about itself and the
  mesh). The batch and mesh sizes are checked where the mesh is made (`train.make_mesh`).

- Meeting: `sync` (a barrier) and `compile_together` (compile ahead, then `sync`). On
  CPU, gloo gives a new group of devices 30 s for every process to join its first
  collective; processes that did unequal work before it (only process 0 finds its
  compilations in the persistent cache) meet first.

The checks talk through the coordinator's key-value store with a timeout, never through a
device collective, so a missing or diverging process ends in an error, not a hang.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import socket
import time
import uuid
from typing import Any

import jax
import ml_collections

from nsync_jax import errors, trees

# How long a process waits for the coordinator, the other processes, or their answers.
DEFAULT_TIMEOUT_S = 300

# Names each exchange and barrier: every process runs them in the same order.
_rounds = itertools.count()
_timeout_s = DEFAULT_TIMEOUT_S


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise errors.ConfigError(f"--coordinator={address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls until the coordinator accepts TCP connections; a ConfigError naming it if it
    does not within `timeout_s` (JAX itself would abort the process with a C++ check)."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise errors.ConfigError(
                    f"cannot reach the coordinator at {address} within {timeout_s:g} s "
                    f"({e}); start process 0 there, check the address and port, and that "
                    "the hosts can reach each other (firewall, proxy variables)"
                ) from e
            time.sleep(0.5)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> bool:
    """Starts `jax.distributed` when asked to; does nothing for a single process.

    Must run before anything touches a device (JAX refuses otherwise).

    Args:
      coordinator: process 0's HOST:PORT; default `$JAX_COORDINATOR_ADDRESS`.
      num_processes: how many processes; default `$JAX_NUM_PROCESSES`.
      process_id: this process's index in [0, num_processes); default `$JAX_PROCESS_ID`.
      auto: start with JAX's cluster auto-detection (TPU pod slices, SLURM, Open MPI);
        given values still win.
      timeout_s: how long to wait for the coordinator and all processes to connect, and
        later for the other processes' answers in the start-up checks.

    Returns:
      Whether the multi-controller runtime was started.

    Raises:
      errors.ConfigError: an unusable address or process numbering, or a coordinator
        that cannot be reached within `timeout_s`.
    """
    global _timeout_s
    _timeout_s = timeout_s
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes == 1 or not (auto or coordinator or num_processes or process_id):
        return False
    if jax.distributed.is_initialized():
        return True
    if not auto and None in (coordinator, num_processes, process_id):
        raise errors.ConfigError(
            "multi-host start needs --coordinator=HOST:PORT, --num_processes and "
            f"--process_id together (got {coordinator!r}, {num_processes!r}, "
            f"{process_id!r}), or --multihost for the cluster's auto-detection"
        )
    if num_processes is not None and process_id is not None:
        if not 0 <= process_id < num_processes:
            raise errors.ConfigError(
                f"--process_id={process_id} is not in [0, --num_processes={num_processes})"
            )
    if coordinator is not None:
        _split_address(coordinator)
    # Only the CPU backend reads this; without it CPU computations cannot span processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        logging.info(
            "process %s of %s: connecting to the coordinator at %s (waiting up to %d s for "
            "all processes)",
            process_id,
            num_processes,
            coordinator,
            timeout_s,
        )
        if process_id:  # Process 0 starts the coordinator; the others wait for it.
            _wait_for_coordinator(coordinator, timeout_s)
    else:
        logging.info("starting jax.distributed with the cluster's auto-detection")
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=timeout_s
        )
    except (ValueError, TypeError) as e:  # JAX's checks of missing or wrong values.
        hint = (
            ""
            if coordinator
            else " (--multihost found no TPU pod slice, SLURM or Open MPI job to detect: "
            "give --coordinator, --num_processes and --process_id)"
        )
        raise errors.ConfigError(f"cannot start multi-host JAX: {e}{hint}") from e
    logging.info(
        "process %d of %d started: %d local devices %s, %d devices in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        [str(d) for d in jax.local_devices()],
        jax.device_count(),
    )
    return True


def describe(mesh: jax.sharding.Mesh) -> str:
    """The line each process logs: its index, its local devices, and the global mesh."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return (
        f"process {jax.process_index()} of {jax.process_count()}: local devices "
        f"{[d.id for d in local]} ({local[0].platform if local else 'none'}); mesh "
        f"{dict(mesh.shape)} over {mesh.devices.size} devices of {jax.process_count()} "
        "processes"
    )


# --- Through the coordinator's key-value store -----------------------------------------------


def _client():
    from jax._src import distributed  # The public API has no key-value store or barrier.

    return distributed.global_state.client


def sync(name: str) -> None:
    """Waits until every process gets here (the coordinator's barrier; no device work).

    Why it is needed: on CPU, gloo gives each new communicator (each group of devices a
    collective first runs on) 30 s for every process to join, not configurable. Processes
    that reach a first collective further apart than that fail ("Gloo context
    initialization failed"), e.g. after process-local work whose compilation only process
    0 finds in the persistent cache (JAX writes entries from process 0 only). Callers sync
    after such work, before the first collectives.
    """
    if jax.process_count() == 1:
        return
    try:
        _client().wait_at_barrier(f"nsync_jax/sync/{next(_rounds)}", _timeout_s * 1000)
    except jax.errors.JaxRuntimeError as e:
        raise errors.ConfigError(
            f"not every process reached {name!r} within {_timeout_s} s: {e}"
        ) from e


def compile_together(jitted: Any, *args: Any) -> Any:
    """`jitted` compiled ahead of time for `args` (arrays or `jax.ShapeDtypeStruct`s with
    shardings), then `sync`: its first run's collectives start on every process together.

    Call the returned executable, not `jitted` (which would compile again).
    """
    compiled = jitted.lower(*args).compile()
    sync(f"compiled {getattr(jitted, '__name__', 'function')}")
    return compiled


def _exchange(name: str, value: str) -> list[str]:
    """Every process's `value`, by process index: each sets its own key, then reads all.

    A process that does not answer within the timeout is a ConfigError naming it.
    """
    client = _client()
    key = f"nsync_jax/{re.sub(r'[^A-Za-z0-9]+', '_', name)}/{next(_rounds)}"
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    values = []
    for process in range(jax.process_count()):
        try:
            values.append(client.blocking_key_value_get(f"{key}/{process}", _timeout_s * 1000))
        except jax.errors.JaxRuntimeError as e:  # DEADLINE_EXCEEDED.
            raise errors.ConfigError(
                f"process {process} did not report its {name} within {_timeout_s} s; is it "
                "running the same command (same launch script and flags)?"
            ) from e
    return values


def check_same_config(config: ml_collections.ConfigDict) -> None:
    """Stops every process if any runs another config, naming the differing fields.

    Hosts that disagree (another checkout, another `--config.` flag) would otherwise build
    other shapes or batches and hang, or silently train something else.
    """
    if jax.process_count() == 1:
        return
    texts = _exchange("config", config.to_json_best_effort(sort_keys=True))
    reference = trees.flatten_names(json.loads(texts[0]))
    problems = []
    for process, text in enumerate(texts):
        if text == texts[0]:
            continue
        other = trees.flatten_names(json.loads(text))
        fields = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        shown = ", ".join(
            f"{k}: {reference.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}"
            for k in fields[:8]
        )
        problems.append(f"process {process} differs from process 0 in {fields} ({shown})")
    if problems:
        raise errors.ConfigError(
            "the processes run different configs; every host must run the same command "
            "with the same config file and flags: " + "; ".join(problems)
        )
    digest = hashlib.sha256(texts[0].encode()).hexdigest()[:16]
    logging.info("config sha256 %s: the same on all %d processes", digest, len(texts))


def check_shared_dir(path: str, what: str, wait_s: float = 5.0) -> None:
    """Stops every process unless all see one folder at `path` (a file system they share).

    Process 0 writes a marker file there; every other process must find it (within
    `wait_s`, for network file systems that show new files late).

    Args:
      path: the folder (created if missing).
      what: how the user names it in messages (e.g. "--workdir").
      wait_s: how long the other processes look for the marker.
    """
    if jax.process_count() == 1:
        return
    os.makedirs(path, exist_ok=True)
    process = jax.process_index()
    token = uuid.uuid4().hex if process == 0 else ""
    if process == 0:
        with open(os.path.join(path, f".nsync-hosts-{token}"), "w") as f:
            f.write(token)
    token = _exchange(f"{what} marker", token)[0]
    marker = os.path.join(path, f".nsync-hosts-{token}")
    deadline = time.monotonic() + wait_s
    while not os.path.isfile(marker) and process != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = _exchange(f"{what} check", "1" if os.path.isfile(marker) else "0")
    if process == 0:
        os.remove(marker)
    blind = [i for i, s in enumerate(seen) if s != "1"]
    if blind:
        raise errors.ConfigError(
            f"{what}={path} is not one folder shared by all hosts: process(es) {blind} do "
            f"not see the file process 0 wrote there ({os.path.basename(marker)}). Every "
            "process writes its share there and reads the others': "
            "put it on a file system every host mounts at the same path (NFS, Filestore, "
            "Lustre, GCS FUSE)"
        )
