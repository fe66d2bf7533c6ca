"""Orbax checkpoints that resume a run exactly, and read-back for export and sampling.

A checkpoint lives in `<workdir>/checkpoints/<step>/` and holds two orbax items:

- `state`: the train state minus the frozen parameters (`step.TrainState.saved()`: step,
  RNG, trainable parameters, optimizer state, any carried g− and EMA, and whatever field a
  later feature adds), one pytree saved with its shardings (OCDBT/Zarr). A new state field
  needs no code here; a field that is None (no EMA, no carried g−) has no leaves, so the
  same format holds runs with and without it.
- `meta` (JSON): the format version, the step, the run's config, the data's fingerprint,
  a fingerprint of the frozen parameters (which are not saved: they are rebuilt from the
  model source), and checksums of the saved arrays.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact. A resume checks, in order: the saved
config against the current one (fields in `RESUMABLE_FIELDS` may change; an older config
lacking one of `ADDED_FIELDS` reads as its value from before the field), the data and the
frozen parameters against their fingerprints, the saved shapes against the live state's,
then restores straight into the live state's shardings and verifies the checksums. Any
failure is a `CheckpointError` (or `ValueError` for a changed config) naming the checkpoint;
nothing falls back to a fresh start or an older step. Export and sampling read only the
trainable parameters or their EMA (an orbax partial restore: the optimizer state is not
read).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nsync_jax import errors, trees

FORMAT_VERSION = 2
STATE, META = "state", "meta"


class _DropOrbaxInfo(logging.Filter):
    """Orbax logs some 80 INFO lines per save through absl; keep its warnings and errors,
    except the one every read-only manager logs on creation ("Given directory is read
    only"): export, sampling and resume open them on purpose, several times a run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if str(record.msg).startswith("Given directory is read only"):
            return False
        return record.levelno >= logging.WARNING


def quiet_orbax_logs() -> None:
    """Drops orbax's INFO lines (see `_DropOrbaxInfo`); `cli.setup_logging` calls it."""
    absl_logger = logging.getLogger("absl")  # absl.logging's Python logger.
    if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxInfo())


# Config fields (exact names or dotted prefixes ending in ".") that may differ between a
# run and its resume: how long to train, how often to log and save, the mesh (restoring
# reshards to whatever the new mesh asks for), and how the same step is computed (attention
# kernel, rematerialisation, micro-batches: memory and speed, not the parameters).
RESUMABLE_FIELDS = (
    "train.num_steps",
    "log.",
    "checkpoint.",
    "sample.",
    "mesh.",
    "model.attention",
    "model.remat",
    "model.remat_policy",
    "train.grad_accum",
)

# Config fields added after checkpoint format 2, each with the value that reproduces how
# runs behaved before it existed (not necessarily today's default): a checkpoint whose
# saved config lacks one was trained that way, so it resumes, exports and samples as if
# it had saved that value. A field added later goes here with its "before" value.
ADDED_FIELDS = {
    "train.ema_decay": 0.0,
    "train.min_snr_gamma": 0.0,
    "train.noise_offset": 0.0,
    "train.timestep_min": 0,
    "train.timestep_max": -1,
    "data.caption_dropout": 0.0,
    "optim.name": "adamw",
    "optim.final_lr_fraction": 0.0,
    "data.val_count": 0,
    "log.val_every": 0,
    "sample.every": 0,
    "sample.prompts": (),
    "data.buckets": (),
    "data.styles": [],  # As JSON (what the saved config holds and is compared in).
    "train.supcon_weight": 0.0,
    "train.supcon_projected": False,
    "train.supcon_temperature": 0.07,
    "train.supcon_base_temperature": 0.07,
    "train.supcon_encoder": "",
    "train.supcon_views": "noise",
    "train.supcon_view_template": "{style} style, {caption}",
}

# Checksums are float32 sums; a resume on another mesh may sum in another order.
_CHECKSUM_RTOL = 1e-4


class CheckpointError(errors.UserError, ValueError):
    """A checkpoint that cannot be resumed from: damaged, incomplete or incompatible."""


def checkpoint_dir(workdir: str) -> str:
    """Where a run in `workdir` keeps its checkpoints."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def step_dir(workdir: str, step: int) -> str:
    """The directory of checkpoint `step` (orbax's default step naming)."""
    return os.path.join(checkpoint_dir(workdir), str(step))


def make_manager(
    workdir: str, keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """An orbax `CheckpointManager` for `<workdir>/checkpoints`.

    Args:
      workdir: the run's directory.
      keep: newest checkpoints kept (older ones deleted after each save); None keeps all.
      read_only: for export and sampling: never creates, saves or deletes anything.

    Returns:
      A manager whose saves are async; the caller decides when to save (`force=True`) and
      must call `wait_until_finished()` and `close()`.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,  # Orbax warns unless 0 when read-only.
        enable_async_checkpointing=True,
        # A run killed mid-save leaves a tmp directory; orbax ignores it, this removes it.
        cleanup_tmp_directories=not read_only,
    )
    handlers = {STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def saved_steps(workdir: str) -> list[int]:
    """Complete checkpoints in `workdir`, oldest first; [] if there are none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    with make_manager(workdir, read_only=True) as manager:
        return sorted(manager.all_steps())


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint's step in `workdir`, or None if there is none."""
    steps = saved_steps(workdir)
    return steps[-1] if steps else None


def _pick_step(workdir: str, step: int | None) -> int:
    steps = saved_steps(workdir)
    if not steps:
        raise errors.NotFound(
            f"no checkpoints in {checkpoint_dir(workdir)} (is --workdir a training run "
            "that saved one?)"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise errors.NotFound(
            f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; saved steps: {steps}"
        )
    return step


# --- Fingerprints and checksums ------------------------------------------------------------


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    # Sum of |x| and of x², both non-negative, so a relative tolerance is meaningful; each
    # sharded leaf reduces where it lives and only scalars come back.
    out = []
    for x in leaves:
        x = x.astype(jnp.float32)
        out.append(jnp.stack([jnp.sum(jnp.abs(x)), jnp.sum(x * x)]))
    return out


def tree_summary(tree: Any) -> dict[str, dict[str, Any]]:
    """Shape, dtype and float32 checksums (sum |x|, sum x²) of every leaf, by dotted name
    (orbax's naming: `trainable.conv_in.kernel`, `opt_state.1.0.mu.w`)."""
    flat = jax.tree.flatten_with_path(tree)[0]
    sums = jax.device_get(_leaf_sums([x for _, x in flat])) if flat else []
    return {
        _dotted(path): {
            "shape": list(np.shape(x)),
            "dtype": str(np.dtype(x.dtype)),
            "sums": [float(s) for s in leaf_sums],
        }
        for (path, x), leaf_sums in zip(flat, sums, strict=True)
    }


def compare_summaries(saved: dict, live: dict, checksums: bool = True) -> list[str]:
    """Human-readable differences between two `tree_summary` results ([] if equal)."""
    problems = _leaf_problems(
        {name: (leaf["shape"], leaf["dtype"]) for name, leaf in saved.items()},
        {name: (leaf["shape"], leaf["dtype"]) for name, leaf in live.items()},
    )
    for name in saved:
        if name in live and name not in problems and checksums:
            if not np.allclose(
                saved[name]["sums"], live[name]["sums"], rtol=_CHECKSUM_RTOL, atol=0.0
            ):
                problems[name] = (
                    f"{name}: checksums (sum|x|, sum x²) saved {saved[name]['sums']}, "
                    f"now {live[name]['sums']}"
                )
    return [problems[name] for name in sorted(problems)]


def _leaf_problems(saved: dict[str, tuple], live: dict[str, tuple]) -> dict[str, str]:
    """By leaf name, how `live` differs from `saved`, both name -> (shape, dtype)."""
    found = trees.diff(saved, live)
    problems = {name: f"{name}: in the checkpoint, not in this run" for name in found.missing}
    for name in found.unexpected:
        problems[name] = f"{name}: in this run, not in the checkpoint"
    for name in found.misshapen:
        (saved_shape, saved_dtype), (live_shape, live_dtype) = saved[name], live[name]
        problems[name] = (
            f"{name}: saved {saved_dtype}{saved_shape}, this run {live_dtype}{live_shape}"
        )
    return problems


def _format_problems(problems: list[str], limit: int = 8) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"\n  {shown}{more}"


def data_fingerprint(batches: Any) -> dict[str, Any]:
    """What identifies the training data: `pipeline.PairedBatches.fingerprint()`.

    Built from each data set's own identity (file names, sizes and times, dataset
    versions, the negatives store's manifest; in-memory sets hash their pixels), so no
    image is decoded for it. The batch of step s is a pure function of (seed, s) and these
    examples, so this plus the step is the iterator's whole position.
    """
    return batches.fingerprint()


# Keys only the first format (CRC32 of every decoded image) wrote.
_OLD_DATA_KEYS = ("positives_crc32", "negatives_crc32")


def check_data_fingerprint(saved: dict[str, Any], live: dict[str, Any], where: str) -> None:
    """Raises `CheckpointError` naming each field in which the training data differ."""
    if any(key in saved for key in _OLD_DATA_KEYS):
        raise CheckpointError(
            f"checkpoint {where} was written by an older version of nsync_jax: its data "
            "fingerprint format differs (CRCs of decoded images), so this version cannot "
            "check that the data are the same; resume it with the version that wrote it, "
            "or start a new workdir"
        )
    saved_flat, live_flat = trees.flatten_names(saved), trees.flatten_names(live)
    changed = sorted(
        k for k in set(saved_flat) | set(live_flat) if saved_flat.get(k) != live_flat.get(k)
    )
    if changed:
        raise CheckpointError(
            f"the training data differ from those of checkpoint {where} in {changed} "
            "(files changed, added or removed, other captions, or other batch settings)"
        )


# --- Config ---------------------------------------------------------------------------------


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as plain JSON values (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def _resumable(name: str) -> bool:
    return any(
        name.startswith(field) if field.endswith(".") else name == field
        for field in RESUMABLE_FIELDS
    )


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Dotted names of fields that differ between a saved config and `config`.

    Fields in `RESUMABLE_FIELDS` are ignored, except `train.num_steps` under a decaying
    learning-rate schedule: the schedule spans it, so another length would change the rate
    of every remaining step. A field present on one side only counts.
    """
    old, new = trees.flatten_names(saved), trees.flatten_names(config_to_json(config))
    fixed = {"train.num_steps"} if new.get("optim.schedule") != "constant" else set()
    return sorted(
        name
        for name in set(old) | set(new)
        if (name in fixed or not _resumable(name))
        and old.get(name, "<absent>") != new.get(name, "<absent>")
    )


def _with_added_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with each of `ADDED_FIELDS` it lacks set to its "before" value (as
    JSON gives it back: a tuple as a list, so it compares equal to a saved one)."""
    saved = copy.deepcopy(saved)
    for name, value in ADDED_FIELDS.items():
        *groups, field = name.split(".")
        if groups[0] not in saved:  # Another kind of run (the style encoder has no `train`).
            continue
        group = saved
        for key in groups:
            group = group.setdefault(key, {})
        group.setdefault(field, json.loads(json.dumps(value)))
    return saved


def _to_config(value: Any) -> Any:
    if isinstance(value, dict):
        return ml_collections.ConfigDict({k: _to_config(v) for k, v in value.items()})
    if isinstance(value, list):  # The configs write sequences as tuples.
        return tuple(_to_config(v) for v in value)
    return value


# --- Read back ------------------------------------------------------------------------------


def _restore(manager: ocp.CheckpointManager, workdir: str, step: int, **items: Any) -> Any:
    """`manager.restore` of `items`; any failure to read is a CheckpointError naming it."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    # Orbax and TensorStore report missing, truncated or undecodable files as ValueError
    # (JSONDecodeError included) or OSError; all mean the same thing to a resume.
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {step_dir(workdir, step)} is damaged or incomplete "
            f"(reading {sorted(items)} failed): {type(e).__name__}: {str(e)[:500]}"
        ) from e


def load_metadata(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The `meta` JSON of checkpoint `step` (newest if None) in `workdir`, its config
    completed with the `ADDED_FIELDS` it predates."""
    step = _pick_step(workdir, step)
    with make_manager(workdir, read_only=True) as manager:
        meta = _restore(manager, workdir, step, **{META: ocp.args.JsonRestore()})[META]
    if isinstance(meta, dict) and meta.get("format") == 1:
        raise CheckpointError(
            f"checkpoint {step_dir(workdir, step)} was written by an older version of "
            "nsync_jax (checkpoint format 1: trainable parameters and optimizer state as "
            f"separate items); this version reads format {FORMAT_VERSION} (the whole train "
            "state as one item). Resume, export or sample it with the version that wrote "
            "it, or start a new workdir"
        )
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {step_dir(workdir, step)} has no metadata of format {FORMAT_VERSION}"
        )
    return {**meta, "config": _with_added_fields(meta["config"])}


def load_run_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config of the run that wrote checkpoint `step` (newest if None) in `workdir`.

    Export and sampling rebuild the model and the scope from it, then call
    `restore_trainable`.
    """
    return _to_config(load_metadata(workdir, step)["config"])


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s with the shapes, dtypes and shardings of `tree`'s arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (namedtuples).
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _dotted(path: tuple) -> str:
    return ".".join(_key_name(k) for k in path)


def _shapes_by_name(tree: Any) -> dict[str, tuple[list[int], str]]:
    """Leaf shape and dtype by a dotted name that matches orbax's (dataclass and namedtuple
    fields by name, sequences by index), so saved metadata and live trees line up."""
    return {
        _dotted(path): (list(x.shape), str(np.dtype(x.dtype)))
        for path, x in jax.tree.flatten_with_path(tree)[0]
    }


def _check_shapes(
    manager: ocp.CheckpointManager, workdir: str, step: int, abstract: Any, what: str
) -> None:
    """Stops with the leaves whose saved shape or dtype differ from `abstract`, a tree of
    the saved state's form (or, for a partial read, a dict of some of its fields)."""
    try:
        saved = manager.item_metadata(step)[STATE]
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {step_dir(workdir, step)}: cannot read the metadata of {STATE!r}: {e}"
        ) from e
    if saved is None:
        raise CheckpointError(f"checkpoint {step_dir(workdir, step)} has no item {STATE!r}")
    saved_shapes = _shapes_by_name(getattr(saved, "tree", saved))
    live_shapes = _shapes_by_name(abstract)
    if isinstance(abstract, dict):  # A partial read compares only the fields it reads.
        fields = tuple(f"{name}." for name in abstract)
        saved_shapes = {k: v for k, v in saved_shapes.items() if k.startswith(fields)}
    problems = _leaf_problems(saved_shapes, live_shapes)
    problems = [problems[name] for name in sorted(problems)]
    if problems:
        raise CheckpointError(
            f"checkpoint {step_dir(workdir, step)} does not fit this run's {what}:"
            + _format_problems(problems)
        )


def _verify_checksums(workdir: str, step: int, meta: dict[str, Any], restored: Any) -> None:
    live = tree_summary(restored)
    saved = {name: leaf for name, leaf in meta["checksums"].items() if name in live}
    problems = compare_summaries(saved, live)
    if problems:
        raise CheckpointError(
            f"checkpoint {step_dir(workdir, step)}: the restored state does not match the "
            "checksums saved with it (damaged files?):" + _format_problems(problems)
        )


def _restore_args(abstract: Any) -> Any:
    return jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract,
    )


# The state fields that hold parameters of the trainable tree's form (`restore_trainable`).
PARAMETER_FIELDS = ("trainable", "ema")


def restore_trainable(
    workdir: str, abstract_trainable: Any, step: int | None = None, field: str = "trainable"
) -> tuple[Any, int]:
    """Restores only the trainable parameters of checkpoint `step` (newest if None).

    The rest of the saved state (optimizer state, carried g−) is not read.

    Args:
      workdir: the training run's directory.
      abstract_trainable: the trainable tree's `jax.ShapeDtypeStruct`s with the shardings
        to restore into, e.g. `abstract_like(trainable)` of the tree that
        `scope.split(runs.build_model(load_run_config(workdir).model, rng)[1])` gives.
      step: which checkpoint; None for the newest.
      field: `"trainable"` for the trained parameters, `"ema"` for their moving average
        (saved when the run had `train.ema_decay > 0`).

    Returns:
      (parameters, step). Arrays land directly in the requested shardings.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in `workdir`.
      CheckpointError: the checkpoint is damaged, its shapes differ from the target's, or
        it holds no `field`.
    """
    if field not in PARAMETER_FIELDS:
        raise ValueError(f"field={field!r}: expected one of {PARAMETER_FIELDS}")
    step = _pick_step(workdir, step)
    meta = load_metadata(workdir, step)
    target = {field: abstract_trainable}
    with make_manager(workdir, read_only=True) as manager:
        _check_shapes(manager, workdir, step, target, f"{field} parameters")
        restored = _restore(
            manager,
            workdir,
            step,
            **{
                STATE: ocp.args.PyTreeRestore(
                    item=target, restore_args=_restore_args(target), partial_restore=True
                )
            },
        )[STATE]
    _verify_checksums(workdir, step, meta, restored)
    return restored[field], step


# --- The training loop's side -----------------------------------------------------------------


def check_resumable(workdir: str, step: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Reads checkpoint `step`'s metadata and stops if `config` may not resume from it.

    Cheap (no arrays are read), so the loop calls it before building the model.

    Returns:
      The checkpoint's metadata.

    Raises:
      ValueError: the config differs in fields outside `RESUMABLE_FIELDS`; the message
        names them.
      CheckpointError: the metadata cannot be read.
    """
    meta = load_metadata(workdir, step)
    differences = config_differences(meta["config"], config)
    if differences:
        old, new = trees.flatten_names(meta["config"]), trees.flatten_names(config_to_json(config))
        lines = [
            f"{n}: saved {old.get(n, '<absent>')!r}, now {new.get(n, '<absent>')!r}"
            for n in differences
        ]
        raise errors.ConfigError(
            f"the config differs from the one that wrote checkpoint {step_dir(workdir, step)} "
            f"in {differences}; resume with the saved config or use a new workdir:"
            + _format_problems(lines, limit=len(lines))
        )
    return meta


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    frozen_summary: dict[str, Any],
    data: dict[str, Any],
) -> None:
    """Starts an async save of `state.saved()` (a `step.TrainState`) at `state.step`.

    Refuses a state that has seen a non-finite value: a checkpoint is always one that can
    be resumed.

    Args:
      manager: from `make_manager`.
      state: the train state; its frozen parameters are not saved, only fingerprinted.
      config: the run's config, saved as JSON.
      frozen_summary: `tree_summary(state.frozen)`, computed once per run.
      data: `data_fingerprint(batches)`.
    """
    step, nonfinite = (int(x) for x in jax.device_get((state.step, state.nonfinite_step)))
    if nonfinite >= 0:
        raise FloatingPointError(
            f"refusing to save step {step}: non-finite values since step {nonfinite}"
        )
    saved = state.saved()
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        # The batch of step s is a pure function of (seed, s): the position is the step.
        "data": {"position": step, **data},
        "config": config_to_json(config),
        "frozen": frozen_summary,
        "checksums": tree_summary(saved),
    }
    manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.PyTreeSave(saved), META: ocp.args.JsonSave(meta)}
        ),
        force=True,
    )


def restore_state(
    manager: ocp.CheckpointManager,
    workdir: str,
    step: int,
    meta: dict[str, Any],
    state: Any,
    frozen_summary: dict[str, Any],
    data: dict[str, Any],
) -> Any:
    """Restores checkpoint `step` into the shardings of the live `state`.

    The live state's saved part is only used for its shapes and shardings; it is deleted
    before reading so memory does not double.

    Args:
      manager: from `make_manager`.
      workdir: the run's directory (for messages).
      step: the checkpoint to restore.
      meta: its metadata, from `check_resumable`.
      state: the freshly initialised `step.TrainState` of this run.
      frozen_summary: `tree_summary(state.frozen)`.
      data: `data_fingerprint(batches)` of this run.

    Returns:
      The state to continue from (the live frozen parameters, everything else restored).

    Raises:
      CheckpointError: the data set or frozen parameters differ from the saved run's, the
        shapes differ, or the files are damaged.
    """
    where = step_dir(workdir, step)
    saved_data = {k: v for k, v in meta["data"].items() if k != "position"}
    check_data_fingerprint(saved_data, data, where)
    if meta["data"]["position"] != step or meta["step"] != step:
        raise CheckpointError(f"checkpoint {where} records step {meta['step']}, not {step}")
    problems = compare_summaries(meta["frozen"], frozen_summary)
    if problems:
        raise CheckpointError(
            f"the frozen parameters of this run differ from those that trained checkpoint "
            f"{where} (a different base model?):" + _format_problems(problems)
        )
    live = state.saved()
    abstract = abstract_like(live)
    _check_shapes(manager, workdir, step, abstract, "train state")
    # Free the initial values before reading: restoring allocates the same sizes again.
    for x in jax.tree.leaves(live):
        x.delete()
    restored = _restore(
        manager,
        workdir,
        step,
        **{STATE: ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract))},
    )[STATE]
    _verify_checksums(workdir, step, meta, restored)
    if int(jax.device_get(restored.step)) != step:
        raise CheckpointError(f"checkpoint {where} holds the state of step {restored.step}")
    return restored.replace(frozen=state.frozen)
