"""Many hosts: two local processes of two CPU devices each (gloo collectives) on a
(data=2, fsdp=2) mesh, against one process with four devices and the same config.

Every multi-process run goes through the real launch scripts (`--coordinator`,
`--num_processes`, `--process_id`), started together by `Processes`, which kills both
process groups if they outlive their deadline and then fails with both logs: a hang is a
failure, never a stuck test run.

Cost: each launch imports the libraries and builds the model in both processes, and a
cold compilation cache compiles everything in both (on CPU each process has its own cache
key; `tests/hosts_site/sitecustomize.py` lets both write the cache, which JAX leaves to
process 0). So the training runs are few: one two-process run that is SIGKILLed, then
SIGTERMed on one process, then resumed to the end, compared with one in-process run.
"""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import demo
from nsync_jax import checkpoint, errors, export, hosts, metrics, negatives, sharding
from nsync_jax import train as train_lib
from nsync_jax.data import negatives_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo config, small: 8 images, 4 per step (one per device), 6 steps.
TRAIN = {
    "train.num_steps": 6,
    "train.batch_size": 4,
    "data.demo_count": 8,
    "log.every": 1,
    "checkpoint.every": 1,
    "checkpoint.keep": 10,
    "mesh.data": 2,
    "mesh.fsdp": 2,
}
NEGATIVES = {
    "data.demo_count": 5,
    "negatives.per_example": 2,
    "negatives.scheduler": "ddim",
    "negatives.num_steps": 2,
    "negatives.size": 0,
    "negatives.batch_per_device": 1,
    "mesh.data": 2,
    "mesh.fsdp": 2,
}
# A launch that trains or generates (process 1 compiles everything) vs one that must fail
# at start-up.
RUN_TIMEOUT_S = 900
FAIL_TIMEOUT_S = 240


def _config(overrides):
    config = demo.get_config()
    for key, value in overrides.items():
        group, name = key.rsplit(".", 1)
        config[group][name] = value
    return config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(
        # sitecustomize: every process writes the compilation cache (see its docstring).
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests", "hosts_site")]),
        HF_HUB_OFFLINE="1",
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES="2",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    for name in ("NSYNC_TRACEBACK", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
        env.pop(name, None)
    env.pop("JAX_PROCESS_ID", None)
    return env


class Processes:
    """Launch-script processes of one multi-process job, each in its own process group.

    Args:
      script: `launch/<script>.py`.
      flags: {flag: value} for every process.
      per_process: for each process to start, its own extra flags (`--process_id` and
        the coordinator flags are added unless it has `num_processes`).
      log_dir: where each process's stdout+stderr goes (`<name>.log<i>`).
      name: names the logs.
      num_processes: the job's size (default: as many as started).
    """

    def __init__(self, script, flags, per_process, log_dir, name, num_processes=None):
        port = _free_port()
        count = num_processes or len(per_process)
        self.paths, self.procs = [], []
        for i, extra in enumerate(per_process):
            values = {
                "coordinator": f"127.0.0.1:{port}",
                "num_processes": count,
                "process_id": i,
                **flags,
                **extra,
            }
            command = [
                sys.executable,
                f"launch/{script}.py",
                *(f"--{k}={v}" for k, v in values.items()),
            ]
            path = os.path.join(str(log_dir), f"{name}.log{i}")
            self.paths.append(path)
            with open(path, "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=_env(),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # Its own group: killed whole on timeout.
                    )
                )
        self.port = port

    def logs(self):
        out = []
        for path in self.paths:
            with open(path, errors="replace") as f:
                out.append(f.read())
        return out

    def _report(self, why):
        tails = "\n".join(
            f"--- process {i} (rc {p.poll()}) ---\n{log[-4000:]}"
            for i, (p, log) in enumerate(zip(self.procs, self.logs(), strict=True))
        )
        return f"{why}\n{tails}"

    def kill(self, sig=signal.SIGKILL):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, timeout):
        """Waits for every process; on the deadline kills them all and fails with the logs.

        Returns:
          (return codes, logs).
        """
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                message = self._report(f"hung: still running after {timeout} s; killed")
                self.kill()
                pytest.fail(message)
        return [p.returncode for p in self.procs], self.logs()

    def wait_until(self, condition, timeout, what):
        """Polls `condition()` while every process runs; fails (killing them) if one exits
        first or the deadline passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                message = self._report(f"no {what} (a process ended, or {timeout} s passed)")
                self.kill()
                pytest.fail(message)
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()  # Never leave a process running, whatever happened.


def _train_flags(workdir, overrides=None):
    values = {f"config.{k}": v for k, v in {**TRAIN, **(overrides or {})}.items()}
    return {"config": "configs/demo.py", "workdir": workdir, **values}


def _launch_train(tmp, name, workdir, overrides=None):
    return Processes("train", _train_flags(workdir, overrides), [{}, {}], tmp, name)


def _run_train(tmp, name, workdir, overrides=None):
    with _launch_train(tmp, name, workdir, overrides) as procs:
        codes, logs = procs.wait(RUN_TIMEOUT_S)
    assert codes == [0, 0], procs._report(f"exit codes {codes}")
    return logs


# --- Bad set-ups fail at start-up, on every process, naming the problem ------------------


def test_bad_setups_fail_fast_naming_the_problem(tmp_path):
    shared = str(tmp_path / "run")
    cases = {
        # name: (flags, per-process flags, job size, what every error line must name)
        "config": (
            _train_flags(shared),
            [{}, {"config.optim.learning_rate": 0.002}],
            2,
            ["run different configs", "optim.learning_rate", "0.001", "0.002"],
        ),
        "workdir": (
            _train_flags(shared),
            [{"workdir": tmp_path / "w0"}, {"workdir": tmp_path / "w1"}],
            2,
            ["--workdir=", "not one folder shared by all hosts", "process(es) [1]"],
        ),
        "batch": (
            _train_flags(str(tmp_path / "b"), {"train.batch_size": 6}),
            [{}, {}],
            2,
            ["train.batch_size=6", "4 devices (2 processes x 2 local devices)"],
        ),
        "mesh": (
            _train_flags(str(tmp_path / "m"), {"mesh.data": 4}),
            [{}, {}],
            2,
            ["mesh data=4 x fsdp=2", "4 devices (2 processes x 2 local devices)"],
        ),
        # Process 1 of 2 alone: nobody starts the coordinator.
        "coordinator": (
            {**_train_flags(str(tmp_path / "c")), "coordinator_timeout": 3},
            [{"process_id": 1}],
            2,
            ["cannot reach the coordinator at 127.0.0.1:", "within 3 s"],
        ),
    }
    started = {}
    try:
        for name, (flags, per_process, size, _) in cases.items():
            started[name] = Processes("train", flags, per_process, tmp_path, name, size)
        for name, (_, _, _, wanted) in cases.items():
            codes, logs = started[name].wait(FAIL_TIMEOUT_S)
            for i, (code, log) in enumerate(zip(codes, logs, strict=True)):
                lines = [line for line in log.splitlines() if line.startswith("error: ")]
                assert code == 2 and lines, f"{name}, process {i}: rc {code}\n{log[-3000:]}"
                for text in wanted:
                    assert text in lines[-1], f"{name}, process {i}: {lines[-1]}"
                assert "Traceback" not in log, f"{name}, process {i}:\n{log[-3000:]}"
    finally:
        for procs in started.values():
            procs.kill()
    port = started["coordinator"].port
    assert f"127.0.0.1:{port}" in started["coordinator"].logs()[0]
    # The marker check leaves nothing behind.
    assert not [n for n in os.listdir(tmp_path / "w0") if n.startswith(".nsync-hosts")]


def test_one_process_starts_nothing_and_partial_flags_are_refused(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert hosts.initialize() is False
    assert hosts.initialize(num_processes=1, process_id=0) is False
    with pytest.raises(errors.ConfigError, match="--num_processes and --process_id"):
        hosts.initialize(coordinator="127.0.0.1:1234")
    with pytest.raises(errors.ConfigError, match=r"--process_id=2 is not in \[0, "):
        hosts.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(errors.ConfigError, match="expected HOST:PORT"):
        hosts.initialize("localhost", num_processes=2, process_id=0)
    # Single-process no-ops: nothing is exchanged, nothing is written.
    hosts.check_same_config(demo.get_config())
    hosts.sync("nothing")


def test_place_puts_each_leaf_in_its_sharding():
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4}))
    tree = {"w": np.arange(64.0).reshape(16, 4), "b": np.ones(3)}
    placed = sharding.place(tree, sharding.tree_shardings(mesh, tree))
    np.testing.assert_array_equal(placed["w"], tree["w"])
    assert placed["w"].sharding == sharding.tree_shardings(mesh, tree)["w"]


# --- Training: equal to one process; SIGTERM and SIGKILL; export ------------------------


def _host(tree):
    return jax.tree.map(np.asarray, tree)


@functools.cache
def _initial():
    """The initial state's trainable parameters (host), and the shapes and shardings of
    what a checkpoint saves of them and of the optimizer state."""
    state = train_lib.setup(_config(TRAIN), devices=jax.devices()[:4]).state
    saved = {"trainable": state.trainable, "opt_state": state.opt_state}
    return _host(state.trainable), checkpoint.abstract_like(saved)


def _final_trainable(workdir, step=None):
    """The trainable parameters and optimizer state of checkpoint `step` (newest)."""
    abstract = _initial()[1]
    step = checkpoint.latest_step(workdir) if step is None else step
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    with checkpoint.make_manager(workdir, read_only=True) as manager:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                )
            ),
        )["state"]
    return _host(restored)


def _norm(trees):
    return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in trees)))


def _assert_trained_alike(one, two, init, tolerance=1e-2):
    """The two runs' parameters differ by under `tolerance` of how far training moved them.

    Not leaf by leaf: float rounding (the collectives sum in another order) is all that
    differs, but Adam turns a gradient that is zero up to rounding (e.g. a bias before a
    GroupNorm) into updates of ±learning rate whose sign is the rounding's, so such leaves
    differ entirely while the rest agree to ~1e-6.
    """
    one, two, init = (jax.tree.leaves(t) for t in (one, two, init))
    moved = _norm(a - i for a, i in zip(one, init, strict=True))
    apart = _norm(b - a for a, b in zip(one, two, strict=True))
    assert apart <= tolerance * moved, f"runs differ by {apart:.3g}; training moved {moved:.3g}"


@pytest.fixture(scope="module")
def one_process():
    """The config trained in this process on four of its devices: (workdir, metrics)."""
    workdir = tempfile.mkdtemp(prefix="nsync-hosts-one-")
    train_lib.train(_config(TRAIN), workdir, devices=jax.devices()[:4])
    yield workdir, metrics.read_metrics(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_processes():
    """The config trained by two processes, interrupted twice:

    1. started fresh, both processes SIGKILLed once checkpoint 2 is written;
    2. restarted (resuming from 2), SIGTERM to process 1 alone once checkpoint 3 is
       written: both must save one same step (before the last) and exit 0.

    Returns:
      (workdir, metrics rows, logs of both launches, exit codes of the second, the step
      each process reports it saved at the SIGTERM).
    """
    tmp = tempfile.mkdtemp(prefix="nsync-hosts-two-")
    workdir = os.path.join(tmp, "run")
    logs = {}
    with _launch_train(tmp, "kill", workdir) as procs:
        procs.wait_until(
            lambda: os.path.isdir(checkpoint.step_dir(workdir, 2)), RUN_TIMEOUT_S, "checkpoint 2"
        )
        procs.kill(signal.SIGKILL)
        logs["kill"] = procs.logs()
    with _launch_train(tmp, "term", workdir) as procs:
        procs.wait_until(
            lambda: os.path.isdir(checkpoint.step_dir(workdir, 3)), RUN_TIMEOUT_S, "checkpoint 3"
        )
        procs.procs[1].send_signal(signal.SIGTERM)
        codes, logs["term"] = procs.wait(RUN_TIMEOUT_S)
    saved = [
        int(log.split("preempted: saved step ")[1].split()[0])
        if "preempted: saved step " in log
        else None
        for log in logs["term"]
    ]
    yield workdir, metrics.read_metrics(workdir), logs, codes, saved
    shutil.rmtree(tmp, ignore_errors=True)


def test_two_processes_train_like_one_through_sigkill_and_sigterm(one_process, two_processes):
    one_dir, one_rows = one_process
    two_dir, two_rows, logs, codes, saved = two_processes
    # SIGTERM to one process: both saved the same step, before the end, and exited 0.
    assert codes == [0, 0], logs["term"][0][-3000:] + logs["term"][1][-3000:]
    assert saved[0] == saved[1] and 3 <= saved[0] < TRAIN["train.num_steps"], saved
    assert checkpoint.latest_step(two_dir) == saved[0]
    # After the SIGKILL both resumed from the newest checkpoint.
    for log in logs["term"]:
        assert "resuming from step 2" in log, log[-3000:]
    # The resumed run equals the uninterrupted one-process run up to where it stopped: one
    # metrics row per step (written by process 0 only), equal losses and NSYNC
    # statistics, equal parameters.
    assert [r["step"] for r in two_rows] == list(range(1, saved[0] + 1))
    for one, two in zip(one_rows, two_rows, strict=False):
        for name in ("loss_pos", "loss_neg", "cosine", "coefficient", "grad_norm_pos"):
            np.testing.assert_allclose(
                two[name], one[name], rtol=1e-5, err_msg=f"{name}, step {one['step']}"
            )
    one_state, two_state = _final_trainable(one_dir, saved[0]), _final_trainable(two_dir)
    _assert_trained_alike(one_state["trainable"], two_state["trainable"], _initial()[0])
    for launch, launch_logs in logs.items():
        for i, log in enumerate(launch_logs):
            assert (
                f"process {i} of 2: local devices [{2048 * i}, {2048 * i + 1}] (cpu); mesh "
                "{'data': 2, 'fsdp': 2} over 4 devices of 2 processes" in log
            ), f"{launch}, process {i}: {log[-3000:]}"
            # Only process 0 shows the progress bar.
            assert ("train:" in log) == (i == 0), f"{launch}, process {i}: {log[-3000:]}"


def _torch_unet(directory):
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(directory, "unet"))
    return {k: v.numpy() for k, v in unet.state_dict().items()}


def test_export_of_the_two_process_run_matches_the_one_process_export(
    one_process, two_processes, tmp_path
):
    step = checkpoint.latest_step(two_processes[0])  # Where the SIGTERM stopped it.
    outputs = {}
    for name, workdir in (("one", one_process[0]), ("two", two_processes[0])):
        outputs[name] = export.export_run(workdir, str(tmp_path / name), step)

    def files(root):
        return sorted(
            os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
        )

    assert files(outputs["one"]) == files(outputs["two"])
    # The untrained parts are the same files; the trained UNet loads in diffusers with
    # the same tensors up to the runs' float differences (`_assert_trained_alike`).
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        with open(os.path.join(outputs["one"], name), "rb") as a:
            with open(os.path.join(outputs["two"], name), "rb") as b:
                assert a.read() == b.read(), name
    one, two = _torch_unet(outputs["one"]), _torch_unet(outputs["two"])
    assert sorted(one) == sorted(two)
    assert all(one[k].shape == two[k].shape for k in one)
    initial = export.torch_state_dict(_initial()[0])  # The unet scope trains the UNet.
    assert sorted(initial) == sorted(one)
    _assert_trained_alike(*([t[k] for k in sorted(one)] for t in (one, two, initial)))


# --- Negatives ---------------------------------------------------------------------------


def test_generate_negatives_on_two_processes_makes_the_one_process_store(tmp_path):
    reference = _config({**NEGATIVES, "negatives.path": str(tmp_path / "one")})
    negatives.generate_store(reference, devices=jax.devices()[:4])
    path = str(tmp_path / "two")
    flags = {
        "config": "configs/demo.py",
        **{f"config.{k}": v for k, v in NEGATIVES.items()},
        "config.negatives.path": path,
    }
    with Processes("generate_negatives", flags, [{}, {}], tmp_path, "negatives") as procs:
        codes, logs = procs.wait(RUN_TIMEOUT_S)
    assert codes == [0, 0], procs._report(f"exit codes {codes}")
    assert ", complete (10 images expected" in logs[0], logs[0][-3000:]

    # Each process made its share, and no image twice: one manifest line per (id, k).
    lines = {}
    for name in ("manifest.jsonl", "manifest-1.jsonl"):
        with open(os.path.join(path, name)) as f:
            lines[name] = [json.loads(line) for line in f]
        assert lines[name], f"{name} is empty: the work was not shared"
    keys = [(e["id"], e["k"]) for entries in lines.values() for e in entries]
    assert len(keys) == len(set(keys)) == 10
    one = negatives_store.read_manifest(str(tmp_path / "one"))
    two = negatives_store.read_manifest(path)
    assert one == two  # Ids, files, captions, prompts, image seeds.
    for entry in one.values():
        with Image.open(os.path.join(tmp_path / "one", entry["file"])) as a:
            with Image.open(os.path.join(path, entry["file"])) as b:
                np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=entry["file"])
    with open(os.path.join(path, negatives.SETTINGS)) as f:
        with open(os.path.join(tmp_path / "one", negatives.SETTINGS)) as g:
            assert json.load(f) == json.load(g)
