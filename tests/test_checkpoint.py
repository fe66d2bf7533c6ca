"""Checkpoints: exact resume, damage and incompatibility detection, keep-last-K, SIGTERM.

Unit tests use a small hand-made `TrainState` (no diffusion model). The end-to-end tests
train the demo config's run a few steps on the one-level plumbing model (`plumbing.py`,
its base built once); those that run `launch/train.py` in subprocesses (SIGKILL and
SIGTERM, then resume) take minutes on two cores and are marked slow.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import plumbing
import pytest
import tensorboard_events

from configs import default, demo
from nsync_jax import checkpoint, metrics, optim, projection, sharding
from nsync_jax import step as step_lib
from nsync_jax import train as train_lib
from nsync_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- A small state, no model -----------------------------------------------------------------


def _config(mode="nsync"):
    config = default.get_config()
    config.train.mode = mode
    config.mesh.fsdp = 4
    return config


def _make_state(config, seed=0, width=32):
    """A TrainState with FSDP-sharded leaves and the optimizer of `config`, a few updates in."""
    mesh = sharding.make_mesh(config.mesh)
    k1, k2 = jax.random.split(jax.random.key(seed))
    k3 = jax.random.key(99)  # The frozen part is the same "base model" whatever the seed.
    trainable = {
        "w": jax.random.normal(k1, (64, width)),
        "b": jax.random.normal(k2, (width,)),
    }
    frozen = {"f": jax.random.normal(k3, (64, 16))}
    tx = optim.make_optimizer(config)

    def init(trainable, frozen):
        return step_lib.init_state(trainable, frozen, tx, jax.random.key(config.seed))

    shardings = sharding.tree_shardings(mesh, jax.eval_shape(init, trainable, frozen))
    state = jax.jit(init, out_shardings=shardings)(trainable, frozen)
    extra = {}
    for i in range(2):
        grads = jax.tree.map(lambda x, i=i: jnp.sin(x + i), state.trainable)
        if config.train.mode == "nsync":
            extra = {"negative_updates": jax.tree.map(jnp.cos, grads)}
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable, **extra)
        state = state.replace(
            step=state.step + 1,
            trainable=jax.tree.map(jnp.add, state.trainable, updates),
            opt_state=opt_state,
        )
    return jax.device_put(state, shardings)


_DATA = {"num_examples": 3, "seed": 0}


def _save(workdir, state, config, keep=None, rng=None):
    if rng is not None:
        state = state.replace(rng=jax.device_put(jax.random.key_data(rng), state.rng.sharding))
    with checkpoint.make_manager(workdir, keep=keep) as manager:
        checkpoint.save(manager, state, config, checkpoint.tree_summary(state.frozen), dict(_DATA))
        manager.wait_until_finished()


def _restore(workdir, state, config, step=None, data=None):
    step = checkpoint.latest_step(workdir) if step is None else step
    meta = checkpoint.check_resumable(workdir, step, config)
    with checkpoint.make_manager(workdir) as manager:
        return checkpoint.restore_state(
            manager,
            workdir,
            step,
            meta,
            state,
            checkpoint.tree_summary(state.frozen),
            dict(_DATA) if data is None else data,
        )


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["nsync", "finetune"])
def test_round_trip_restores_exact_values_into_live_shardings(tmp_path, mode):
    config = _config(mode)
    saved = _make_state(config)
    expected = _host((saved.trainable, saved.opt_state))
    rng = jax.random.fold_in(jax.random.key(7), 3)
    _save(tmp_path, saved, config, rng=rng)
    assert checkpoint.saved_steps(tmp_path) == [2]

    fresh = _make_state(config, seed=1)  # Different values, same shapes and shardings.
    shardings = jax.tree.map(lambda x: x.sharding, (fresh.trainable, fresh.opt_state))
    state = _restore(tmp_path, fresh, config)
    restored_rng = jax.random.wrap_key_data(state.rng)

    _assert_trees_equal((state.trainable, state.opt_state), expected)
    assert jax.tree.map(lambda x: x.sharding, (state.trainable, state.opt_state)) == shardings
    assert state.trainable["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert int(state.step) == 2 and int(state.nonfinite_step) == -1
    np.testing.assert_array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))
    if mode == "nsync":
        assert isinstance(state.opt_state[0], projection.NsyncProjectionState)
        assert float(state.opt_state[0].cosine) != 0.0


def test_keeps_the_newest_k(tmp_path):
    config = _config()
    state = _make_state(config)
    with checkpoint.make_manager(tmp_path, keep=2) as manager:
        for step in range(1, 6):
            state = state.replace(step=jnp.int32(step))
            checkpoint.save(manager, state, config, {}, {})
        manager.wait_until_finished()
    assert checkpoint.saved_steps(tmp_path) == [4, 5]
    assert checkpoint.latest_step(tmp_path) == 5


def test_refuses_to_save_a_nonfinite_state(tmp_path):
    config = _config()
    state = _make_state(config).replace(nonfinite_step=jnp.int32(1))
    with pytest.raises(FloatingPointError, match="non-finite values since step 1"):
        _save(tmp_path, state, config)
    assert checkpoint.saved_steps(tmp_path) == []


def test_truncated_array_file_is_an_error_naming_the_checkpoint(tmp_path):
    config = _config()
    state = _make_state(config)
    _save(tmp_path, state, config)
    files = glob.glob(os.path.join(checkpoint.step_dir(tmp_path, 2), checkpoint.STATE, "d", "*"))
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=checkpoint.step_dir(tmp_path, 2)):
        _restore(tmp_path, _make_state(config), config)


def test_deleted_metadata_is_an_error_naming_the_checkpoint(tmp_path):
    config = _config()
    _save(tmp_path, _make_state(config), config)
    os.remove(os.path.join(checkpoint.step_dir(tmp_path, 2), "meta", "metadata"))
    with pytest.raises(checkpoint.CheckpointError, match=checkpoint.step_dir(tmp_path, 2)):
        checkpoint.load_run_config(tmp_path)


def test_swapped_array_files_fail_the_checksums(tmp_path):
    # Arrays that decode fine but are not the ones saved with this metadata.
    config = _config()
    state = _make_state(config)
    _save(tmp_path, state, config)
    _save(
        tmp_path,
        state.replace(step=jnp.int32(3), trainable=jax.tree.map(jnp.cos, state.trainable)),
        config,
    )
    shutil.rmtree(os.path.join(checkpoint.step_dir(tmp_path, 3), checkpoint.STATE))
    shutil.copytree(
        os.path.join(checkpoint.step_dir(tmp_path, 2), checkpoint.STATE),
        os.path.join(checkpoint.step_dir(tmp_path, 3), checkpoint.STATE),
    )
    with pytest.raises(checkpoint.CheckpointError, match="checksums"):
        _restore(tmp_path, _make_state(config), config)


def test_wrong_shapes_are_an_error_naming_the_leaf(tmp_path):
    config = _config()
    _save(tmp_path, _make_state(config), config)
    wider = _make_state(config, width=48)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"w: saved float32\[64, 32\], this run float32\[64, 48\]"
    ):
        checkpoint.restore_trainable(tmp_path, checkpoint.abstract_like(wider.trainable))
    # The optimizer state (Adam's moments) is checked as well, by field name.
    with pytest.raises(checkpoint.CheckpointError, match=r"1\.0\.mu\.w"):
        _restore(tmp_path, wider.replace(trainable=_make_state(config).trainable), config)


def test_different_frozen_parameters_are_an_error(tmp_path):
    config = _config()
    state = _make_state(config)
    _save(tmp_path, state, config)
    other = _make_state(config).replace(frozen={"f": state.frozen["f"] * 1.01})
    with pytest.raises(checkpoint.CheckpointError, match="frozen parameters .* differ"):
        _restore(tmp_path, other, config)


def test_changed_data_is_an_error(tmp_path):
    config = _config()
    _save(tmp_path, _make_state(config), config)
    with pytest.raises(checkpoint.CheckpointError, match="num_examples"):
        _restore(tmp_path, _make_state(config), config, data={**_DATA, "num_examples": 4})


def test_config_differences_name_the_fields_that_matter(tmp_path):
    config = _config()
    _save(tmp_path, _make_state(config), config)
    allowed = _config()
    allowed.train.num_steps += 5
    allowed.log.every = 7
    allowed.checkpoint.every = 3
    allowed.checkpoint.keep = 9
    assert checkpoint.config_differences(checkpoint.config_to_json(config), allowed) == []
    changed = _config()
    changed.nsync.rule = "v42"
    changed.model.tiny.unet_channels = (32, 96)
    with pytest.raises(ValueError, match=r"\['model\.tiny\.unet_channels', 'nsync\.rule'\]"):
        checkpoint.check_resumable(tmp_path, 2, changed)


def test_a_decaying_schedule_fixes_the_number_of_steps():
    # The schedule spans train.num_steps: another length changes every remaining rate.
    config = _config()
    config.optim.update(schedule="cosine", warmup_steps=10)
    longer = _config()
    longer.optim.update(schedule="cosine", warmup_steps=10)
    longer.train.num_steps += 100
    saved = checkpoint.config_to_json(config)
    assert checkpoint.config_differences(saved, longer) == ["train.num_steps"]
    constant = _config()
    constant.train.num_steps += 100
    assert checkpoint.config_differences(checkpoint.config_to_json(_config()), constant) == []


def test_load_run_config_and_restore_trainable_for_export(tmp_path):
    config = _config()
    state = _make_state(config)
    _save(tmp_path, state, config)
    loaded = checkpoint.load_run_config(tmp_path)
    assert loaded.model.tiny.unet_channels == config.model.tiny.unet_channels  # A tuple again.
    assert loaded.to_dict() == config.to_dict()
    trainable, step = checkpoint.restore_trainable(
        tmp_path, checkpoint.abstract_like(_make_state(config, seed=3).trainable), step=2
    )
    assert step == 2
    _assert_trees_equal(trainable, state.trainable)
    with pytest.raises(FileNotFoundError, match="saved steps: \\[2\\]"):
        checkpoint.restore_trainable(tmp_path, checkpoint.abstract_like(trainable), step=5)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint.load_run_config(tmp_path / "elsewhere")


# --- The loop: tiny demo model -----------------------------------------------------------


_DEMO = {
    **plumbing.MODEL,
    "train.num_steps": 5,
    "train.batch_size": 8,
    "data.demo_count": 16,
    "log.every": 2,
    "checkpoint.every": 2,
    "checkpoint.keep": 2,
}


def _demo_config(**overrides):
    config = demo.get_config()
    for key, value in {**_DEMO, **overrides}.items():
        group, name = key.rsplit(".", 1)
        config[group][name] = value
    return config


def _train(config, workdir):
    """`train.train` on the plumbing model's base, built once (`plumbing.base()`)."""
    return train_lib.train(config, str(workdir), base=plumbing.base())


def _train_in_process(workdir, **overrides):
    state = _train(_demo_config(**overrides), workdir)
    return _host((state.trainable, state.opt_state))


@pytest.fixture(scope="module")
def finetune_reference():
    """An uninterrupted 5-step finetune run: (workdir, final trainable and opt state)."""
    workdir = tempfile.mkdtemp(prefix="nsync-ckpt-ref-")
    final = _train_in_process(workdir, **{"train.mode": "finetune"})
    yield workdir, final
    shutil.rmtree(workdir, ignore_errors=True)


def test_loop_saves_every_k_and_at_the_end_and_resumes_exactly(
    finetune_reference, tmp_path, caplog
):
    ref_dir, expected = finetune_reference
    # Saved every 2 steps and at the end (5), keeping the newest 2.
    assert checkpoint.saved_steps(ref_dir) == [4, 5]
    # A run that stopped after step 4: its checkpoint 4 is the reference's.
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(checkpoint.step_dir(workdir, 5))
    with caplog.at_level("INFO"):
        final = _train_in_process(workdir, **{"train.mode": "finetune"})
    assert "resuming from step 4" in caplog.text
    _assert_trees_equal(final, expected)
    assert checkpoint.saved_steps(workdir) == [4, 5]
    # Step 5 ran twice (before the stop and after the resume) but is logged once, and
    # TensorBoard is told to drop the first run's events after step 4.
    assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [2, 4, 5]
    tensorboard_events.assert_shows_metrics_jsonl(str(workdir))


def test_ctrl_c_saves_the_step_reached_interrupts_and_resumes_exactly(
    finetune_reference, tmp_path, monkeypatch, caplog
):
    _, expected = finetune_reference
    workdir = tmp_path / "run"
    # No regular saves: before the last step, only the stop can write a checkpoint.
    overrides = {"train.mode": "finetune", "checkpoint.every": 0}
    make_batch = pipeline.PairedBatches.batch

    def ctrl_c_during_step_3(batches, step):
        if step == 2:  # The batch of the step that ends at 3: the loop sees the signal then.
            os.kill(os.getpid(), signal.SIGINT)
        return make_batch(batches, step)

    monkeypatch.setattr(pipeline.PairedBatches, "batch", ctrl_c_during_step_3)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        _train_in_process(workdir, **overrides)
    monkeypatch.undo()
    assert checkpoint.saved_steps(workdir) == [3]
    assert "interrupted: saved step 3 to " in caplog.text
    final = _train_in_process(workdir, **overrides)
    _assert_trees_equal(final, expected)
    assert checkpoint.saved_steps(workdir) == [3, 5]


def test_loop_resumes_amortized_negatives_exactly_mid_period(tmp_path):
    # g− is fresh at steps 0 and 3; a resume at step 4 must reuse step 3's saved g−.
    overrides = {"train.scope": "textual_inversion", "nsync.negative_every": 3}
    reference = _train(_demo_config(**overrides), str(tmp_path / "ref"))
    workdir = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", workdir)
    shutil.rmtree(checkpoint.step_dir(workdir, 5))
    meta = checkpoint.load_metadata(str(workdir), 4)
    assert any(name.startswith("negative.grad.") for name in meta["checksums"])
    resumed = _train(_demo_config(**overrides), str(workdir))
    _assert_trees_equal(
        _host((resumed.trainable, resumed.opt_state, resumed.negative)),
        _host((reference.trainable, reference.opt_state, reference.negative)),
    )
    # Without the saved g− the resume would start from zeros: the checkpoint must hold it.
    assert float(jnp.abs(reference.negative["grad"]["token_embedding"]).sum()) > 0


# Every training option of the `train`, `data` and `optim` groups on at once.
_OPTIONS = {
    "train.ema_decay": 0.9,
    "train.min_snr_gamma": 5.0,
    "train.noise_offset": 0.1,
    "train.timestep_min": 100,
    "train.timestep_max": 900,
    "data.caption_dropout": 0.5,
    "optim.name": "lion",
    "optim.schedule": "warmup_cosine",
    "optim.warmup_steps": 2,
    "optim.final_lr_fraction": 0.1,
    "mesh.fsdp": 4,
}


def test_loop_with_ema_and_every_option_resumes_exactly(tmp_path):
    reference = _train(_demo_config(**_OPTIONS), str(tmp_path / "ref"))
    workdir = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", workdir)
    shutil.rmtree(checkpoint.step_dir(workdir, 5))
    assert any(
        name.startswith("ema.") for name in checkpoint.load_metadata(str(workdir))["checksums"]
    )
    resumed = _train(_demo_config(**_OPTIONS), str(workdir))
    _assert_trees_equal(
        _host((resumed.trainable, resumed.opt_state, resumed.ema)),
        _host((reference.trainable, reference.opt_state, reference.ema)),
    )
    # The EMA is sharded as the parameters, and lags behind them.
    assert jax.tree.map(lambda x: x.sharding, resumed.ema) == jax.tree.map(
        lambda x: x.sharding, resumed.trainable
    )
    assert "fsdp" in resumed.ema["conv_in"]["kernel"].sharding.spec
    kernel, ema_kernel = (
        np.asarray(t["conv_in"]["kernel"]) for t in (resumed.trainable, resumed.ema)
    )
    assert not np.array_equal(kernel, ema_kernel)


def _edit_meta(workdir, step, edit):
    """Rewrites checkpoint `step`'s metadata JSON with `edit(meta)` (as an older version
    of nsync_jax would have written it)."""
    meta_file = os.path.join(checkpoint.step_dir(workdir, step), "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    edit(meta)
    with open(meta_file, "w") as f:
        json.dump(meta, f)


def test_a_checkpoint_from_before_the_training_options_resumes_without_them(tmp_path):
    # Its saved config lacks every field of ADDED_FIELDS: it was trained as they are off.
    config = _config()
    _save(tmp_path, _make_state(config), config)

    def drop_added_fields(meta):
        for name in checkpoint.ADDED_FIELDS:
            group, field = name.split(".")
            del meta["config"][group][field]

    _edit_meta(tmp_path, 2, drop_added_fields)
    state = _restore(tmp_path, _make_state(config, seed=1), config)
    assert int(state.step) == 2 and state.ema is None
    assert checkpoint.load_run_config(tmp_path).train.ema_decay == 0.0
    with_ema = _config()
    with_ema.train.ema_decay = 0.99
    with pytest.raises(ValueError, match=r"\['train\.ema_decay'\]"):
        checkpoint.check_resumable(str(tmp_path), 2, with_ema)


def test_loop_refuses_a_changed_config(finetune_reference):
    ref_dir, _ = finetune_reference
    with pytest.raises(ValueError, match=r"\['nsync\.rule'\]"):
        _train(_demo_config(**{"train.mode": "finetune", "nsync.rule": "v41"}), ref_dir)
    with pytest.raises(ValueError, match="model.tiny.unet_channels"):
        train_lib.train(  # Refused before any model is built.
            _demo_config(**{"train.mode": "finetune", "model.tiny.unet_channels": (32, 32)}),
            ref_dir,
        )
    with pytest.raises(FileNotFoundError, match="restore_step=3: no such checkpoint"):
        _train(_demo_config(**{"train.mode": "finetune", "checkpoint.restore_step": 3}), ref_dir)
    with pytest.raises(ValueError, match="newer checkpoints \\[5\\]"):
        _train(_demo_config(**{"train.mode": "finetune", "checkpoint.restore_step": 4}), ref_dir)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # TensorStore.
def test_loop_stops_on_a_damaged_latest_checkpoint(finetune_reference, tmp_path):
    ref_dir, _ = finetune_reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    latest = checkpoint.step_dir(workdir, 5)
    os.remove(max(glob.glob(os.path.join(latest, checkpoint.STATE, "d", "*")), key=os.path.getsize))
    with pytest.raises(checkpoint.CheckpointError, match=latest):
        _train(_demo_config(**{"train.mode": "finetune", "train.num_steps": 7}), workdir)
    assert checkpoint.saved_steps(workdir) == [4, 5]  # Nothing overwritten, no fresh start.


# --- Real processes: SIGKILL and SIGTERM, then resume ------------------------------------


def _command(workdir, overrides):
    flags = [f"--config.{k}={v}" for k, v in {**_DEMO, **overrides}.items()]
    return [
        sys.executable,
        "launch/train.py",
        "--config=configs/demo.py",
        *flags,
        f"--workdir={workdir}",
    ]


def _env():
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES="8",  # As tests/conftest.py, so the compiled step is the same.
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    return env


def _start_and_signal(workdir, overrides, sig, ready):
    """Starts a run and sends `sig` once `ready()` (e.g. a checkpoint is complete)."""
    log_path = os.path.join(str(workdir) + ".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _command(workdir, overrides), cwd=REPO, env=_env(), stdout=log, stderr=log
        )
        deadline = time.monotonic() + 600
        while not ready():
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.05)
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    return rc, open(log_path).read()


def _resume(workdir, overrides):
    result = subprocess.run(
        _command(workdir, overrides), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _final_arrays(workdir, like):
    abstract = checkpoint.abstract_like({"trainable": like[0], "opt_state": like[1]})
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    with checkpoint.make_manager(workdir, read_only=True) as manager:
        restored = manager.restore(
            checkpoint.latest_step(workdir),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                )
            ),
        )["state"]
    return _host((restored["trainable"], restored["opt_state"]))


@pytest.mark.slow
def test_sigkill_between_saves_then_resume_is_bitwise_equal(tmp_path):
    overrides = {"train.mode": "nsync", "train.num_steps": 6}
    expected = _train_in_process(tmp_path / "reference", **overrides)
    like = jax.tree.map(jnp.asarray, expected)
    workdir = tmp_path / "run"
    rc, log = _start_and_signal(
        workdir, overrides, signal.SIGKILL, lambda: os.path.isdir(checkpoint.step_dir(workdir, 2))
    )
    assert rc == -signal.SIGKILL
    resumed_from = checkpoint.latest_step(workdir)
    assert 2 <= resumed_from < 6, log[-2000:]  # Killed between saves, before the end.
    stderr = _resume(workdir, overrides)
    assert f"resuming from step {resumed_from}" in stderr
    assert checkpoint.latest_step(workdir) == 6
    _assert_trees_equal(_final_arrays(workdir, like), expected)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(finetune_reference, tmp_path):
    _, expected = finetune_reference
    like = jax.tree.map(jnp.asarray, expected)
    overrides = {"train.mode": "finetune", "checkpoint.every": 1}
    workdir = tmp_path / "run"
    rc, log = _start_and_signal(
        workdir, overrides, signal.SIGTERM, lambda: os.path.isdir(checkpoint.step_dir(workdir, 1))
    )
    assert rc == 0, log[-3000:]
    assert "preempted: saved step" in log
    stopped_at = int(log.split("preempted: saved step ")[1].split()[0])
    assert checkpoint.latest_step(workdir) == stopped_at < 5
    stderr = _resume(workdir, overrides)
    assert f"resuming from step {stopped_at}" in stderr
    _assert_trees_equal(_final_arrays(workdir, like), expected)


@pytest.mark.slow
def test_launch_train_ctrl_c_saves_the_step_reached_and_exits_130(tmp_path):
    """A few minutes on a shared two-core machine (start-up and compile)."""
    workdir = tmp_path / "run"
    # Many steps and no regular saves: the run cannot end, or save, before the Ctrl-C.
    overrides = {"train.mode": "finetune", "train.num_steps": 1000, "checkpoint.every": 0}
    overrides.update({"log.every": 1, "sample.every": 0})

    def trained_a_step():  # Step 1's row of metrics.jsonl is written.
        path = workdir / metrics.METRICS_FILE
        return os.path.exists(path) and os.path.getsize(path) > 0

    rc, log = _start_and_signal(workdir, overrides, signal.SIGINT, trained_a_step)
    assert rc == 130, log[-3000:]
    assert "interrupted: saved step " in log, log[-3000:]
    stopped_at = int(log.split("interrupted: saved step ")[1].split()[0])
    assert checkpoint.saved_steps(workdir) == [stopped_at], log[-3000:]
    assert 1 <= stopped_at < 1000
    assert log.rstrip().endswith("error: interrupted"), log[-3000:]


def test_orbax_info_lines_are_dropped_but_its_warnings_kept():
    import logging

    checkpoint.quiet_orbax_logs()  # What `cli.setup_logging` (and conftest.py) installs.
    absl_logger = logging.getLogger("absl")

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "msg", (), None)

    orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not absl_logger.filter(record(logging.INFO, orbax_file))
    assert absl_logger.filter(record(logging.WARNING, orbax_file))
    assert absl_logger.filter(record(logging.INFO, "/repo/nsync_jax/train.py"))


# --- The data fingerprint ------------------------------------------------------------------


def _save_with_data(workdir, state, config, data):
    with checkpoint.make_manager(str(workdir)) as manager:
        frozen = checkpoint.tree_summary(state.frozen)
        checkpoint.save(manager, state, config, frozen, data)
        manager.wait_until_finished()


def test_old_data_fingerprint_format_is_refused_clearly(tmp_path):
    config = _config()
    old = {**_DATA, "positives_crc32": 123, "negatives_crc32": None}  # Before fingerprint().
    _save_with_data(tmp_path, _make_state(config), config, old)
    with pytest.raises(checkpoint.CheckpointError, match="older version.*format differs"):
        _restore(tmp_path, _make_state(config), config)


def test_changed_nested_data_fingerprint_names_the_field(tmp_path):
    config = _config()
    saved = {**_DATA, "positives": {"source": {"kind": "folder", "bytes": 10}}}
    _save_with_data(tmp_path, _make_state(config), config, saved)
    changed = {**_DATA, "positives": {"source": {"kind": "folder", "bytes": 11}}}
    with pytest.raises(checkpoint.CheckpointError, match=r"\['positives\.source\.bytes'\]"):
        _restore(tmp_path, _make_state(config), config, data=changed)


def _image_folder(root, count=8):
    """`count` small captioned paintings in a folder with metadata.jsonl."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "painting {i}"}}')
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_loop_on_a_folder_resumes_and_refuses_changed_files(tmp_path, caplog):
    # The headline command's set-up: finetune on a folder of images (read lazily).
    data_dir = tmp_path / "paintings"
    _image_folder(data_dir)
    overrides = {
        "train.mode": "finetune",
        "data.source": "folder",
        "data.path": str(data_dir),
        "train.num_steps": 2,
        "checkpoint.every": 2,
    }
    workdir = tmp_path / "run"
    _train(_demo_config(**overrides), str(workdir))
    assert checkpoint.saved_steps(workdir) == [2]
    meta = checkpoint.load_metadata(str(workdir), 2)
    assert meta["data"]["positives"]["source"]["kind"] == "folder"
    with caplog.at_level("INFO"):
        state = _train(_demo_config(**{**overrides, "train.num_steps": 3}), str(workdir))
    assert "resuming from step 2" in caplog.text and int(state.step) == 3
    image = data_dir / "5.png"
    os.utime(image, ns=(1, 10**18))  # Copied elsewhere: same bytes, other time.
    _train(_demo_config(**{**overrides, "train.num_steps": 4}), str(workdir))
    data = bytearray(image.read_bytes())
    data[-20] ^= 1  # Rewritten: same size, other bytes.
    image.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"positives\.source"):
        _train(_demo_config(**{**overrides, "train.num_steps": 4}), str(workdir))


def test_a_checkpoint_of_the_old_format_is_refused_clearly(tmp_path):
    # Format 1 saved `trainable` and `opt_state` as separate items and the RNG in the
    # metadata; this version reads the whole state as one item.
    config = _config()
    _save(tmp_path, _make_state(config), config)
    _edit_meta(tmp_path, 2, lambda meta: meta.update(format=1))
    for read in (
        lambda: checkpoint.check_resumable(str(tmp_path), 2, config),
        lambda: checkpoint.restore_trainable(tmp_path, checkpoint.abstract_like({})),
        lambda: checkpoint.load_run_config(tmp_path),
    ):
        with pytest.raises(checkpoint.CheckpointError, match="older version .*format 1"):
            read()


def test_added_fields_only_fill_groups_the_saved_config_has():
    # A style-encoder stage's config has `data` and `log` but no `train` or `optim`: an
    # invented `train.ema_decay` would read as a changed config on every resume.
    completed = checkpoint._with_added_fields({"data": {"source": "demo"}, "log": {}})
    assert set(completed) == {"data", "log"}
    assert completed["data"]["caption_dropout"] == 0.0 and completed["log"]["val_every"] == 0
