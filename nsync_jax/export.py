"""Writing a trained model as a PyTorch diffusers `StableDiffusionPipeline` folder.

`export_pipeline(model, params, output_dir, scope=..., base_dir=...)` writes
`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`, which
`StableDiffusionPipeline.from_pretrained(output_dir)` loads:

- What trained is converted from our Flax params with `weights.torch_key` and
  `weights.to_torch_layout` (the rule loading uses, run backwards): the UNet for the
  `unet` scope; for `textual_inversion`, the learned row goes to
  `learned_embeds.safetensors` as `{placeholder: [1, D]}` (diffusers' textual-inversion
  format, for `pipe.load_textual_inversion(output_dir)`; several styles' tokens go one
  per file, `torch_files.save_learned_tokens`) and the text encoder and tokenizer stay
  the base's, without the placeholders.
- The frozen components are copied verbatim from the base folder when it has them in
  safetensors under our key names (byte for byte: no renaming to get wrong), else
  converted from our params: a tiny model, a base stored as `.bin` or Flax msgpack, or a
  transformers-5 text encoder (keys without `text_model.`, which transformers 4 cannot
  read). A transformers-5 tokenizer (`tokenizer.json` only) is written as `vocab.json` +
  `merges.txt`, which transformers 4 and 5 both read.

On many processes (`launch/export.py` run on every host) each process restores and
gathers the arrays, and process 0 alone writes the folder. A checkpoint written by many
processes exports the same from one.

Every converted state dict is checked key by key and shape by shape against what the
PyTorch class expects: the base's weight files where there are some (in their own key
names), else the PyTorch class built on torch's meta device when torch is installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from nsync_jax import clip_tokenizer, errors, lora, lora_export, models, trees, weights
from nsync_jax import scope as scope_lib
from nsync_jax.torch_files import save_learned_tokens, to_numpy, write_json

Params = dict[str, Any]

TORCH_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
}
# The diffusers release whose loaders our exports are tested against (`model_index.json`'s
# `_diffusers_version`, which diffusers reads only to warn about much newer files).
DIFFUSERS_VERSION = "0.42.1"
# Used when the scheduler config names no class (tiny models): SD 1.5's default sampler.
DEFAULT_SCHEDULER = {"_class_name": "PNDMScheduler", "skip_prk_steps": True}
TORCH_DTYPES = {"float32": np.float32, "float16": np.float16}


def torch_state_dict(params: Params, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """A component's Flax params as a PyTorch state dict of NumPy arrays (floats in `dtype`)."""
    state = {}
    for path, value in flatten_dict(params).items():
        array = to_numpy(value)
        if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
            array = array.astype(dtype)
        state[weights.torch_key(path)] = weights.to_torch_layout(path[-1], array)
    return state


def torch_reference_shapes(component: str, component_dir: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the PyTorch class for `component_dir/config.json`.

    Built on torch's meta device: no memory, no weights; needs torch.
    """
    import diffusers  # Only this check needs torch and diffusers; export itself does not.
    import torch
    import transformers

    with torch.device("meta"):
        if component == "text_encoder":
            config = transformers.CLIPTextConfig.from_pretrained(component_dir)
            module = transformers.CLIPTextModel(config)
        else:
            cls = getattr(diffusers, TORCH_CLASSES[component][1])
            module = cls.from_config(cls.load_config(component_dir))
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_torch_keys(
    what: str, state: dict[str, np.ndarray], reference: dict[str, tuple[int, ...]]
) -> None:
    """Raises ValueError naming missing, unexpected and misshapen tensors of `state`."""
    reference = {k: tuple(v) for k, v in reference.items() if not weights.is_torch_buffer(k)}
    found = trees.diff(reference, {k: tuple(v.shape) for k, v in state.items()})
    if found:
        raise weights.mismatch_error(
            what,
            sorted(found.missing),
            sorted(found.unexpected),
            [f"{k} {state[k].shape} (expected {reference[k]})" for k in sorted(found.misshapen)],
        )


def _base_files(base_dir: str | None, component: str) -> list[str]:
    """The base's PyTorch weight files of `component` (safetensors, else `.bin`), or []."""
    if base_dir is None:
        return []
    directory = os.path.join(base_dir, component)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return []
    # Only the plain (non-variant) files: `from_pretrained` without `variant` reads those.
    for fmt in weights.TORCH_FORMATS:
        if files := weights.weight_files(directory, component, fmt, variant=""):
            return files
    return []


def _copyable(component: str, base_files: list[str]) -> bool:
    """Whether the base's files load as they are in transformers 4 and diffusers 0.39.

    Safetensors with our key names are; `.bin` files are converted (safetensors out), and
    so is a transformers-5 text encoder, whose keys lack the `text_model.` prefix.
    """
    if not base_files or not base_files[0].endswith(".safetensors"):
        return False
    keys = weights.torch_file_shapes(base_files)
    return weights.stored_key_rule(component, keys) is weights.same_key


def _diffusers_config(module: Any) -> dict[str, Any]:
    """The diffusers `config.json` of our UNet or VAE (its config's `to_dict`)."""
    return {**module.config.to_dict(), "_diffusers_version": DIFFUSERS_VERSION}


def _copy_component(base_dir: str, component: str, output_dir: str, files: list[str]) -> None:
    target = os.path.join(output_dir, component)
    os.makedirs(target, exist_ok=True)
    for name in [os.path.join(base_dir, component, "config.json"), *files]:
        shutil.copy2(name, target)
    index = os.path.join(
        base_dir, component, weights.WEIGHT_FILES[component]["safetensors"] + ".index.json"
    )
    if os.path.isfile(index):
        shutil.copy2(index, target)


def _write_component(
    model: models.StableDiffusion,
    component: str,
    component_params: Params,
    output_dir: str,
    base_files: list[str],
    dtype: np.dtype,
    vocab_size: int,
) -> None:
    """Converts one component from Flax, writes its config and weights, checks the keys."""
    target = os.path.join(output_dir, component)
    os.makedirs(target, exist_ok=True)
    if component == "text_encoder":
        config = model.text_encoder.config.to_dict()
        config.update(vocab_size=vocab_size, architectures=[TORCH_CLASSES[component][1]])
        write_json(os.path.join(target, "config.json"), config)
    elif base_files:  # Training keeps the architecture: the base config stays exact.
        shutil.copy2(os.path.join(os.path.dirname(base_files[0]), "config.json"), target)
    else:
        module = model.unet if component == "unet" else model.vae
        write_json(
            os.path.join(target, "config.json"),
            _diffusers_config(module),
        )
    state = torch_state_dict(component_params, dtype)
    what = f"exported {component}"
    reference = None
    if base_files:
        reference = weights.torch_file_shapes(base_files)
    else:
        try:
            reference = torch_reference_shapes(component, target)
        except ImportError:
            logging.warning("torch is not installed: %s keys checked only by the rule", what)
    if reference is not None:
        # Checked in the reference's names (transformers 5 drops `text_model.`); written in
        # ours, which transformers 4 and 5 both read.
        stored_key = weights.stored_key_rule(component, reference)
        check_torch_keys(what, {stored_key(k): v for k, v in state.items()}, reference)
    save_file(
        state,
        os.path.join(target, weights.WEIGHT_FILES[component]["safetensors"]),
        metadata={"format": "pt"},
    )


def _save_base_tokenizer(tokenizer: Any, target: str, vocab_size: int) -> None:
    """Saves `tokenizer` without the tokens added past `vocab_size` (the placeholders), in
    both layouts: `vocab.json` + `merges.txt` (what transformers 4 reads) beside what the
    installed transformers writes (transformers 5: `tokenizer.json`)."""
    tokenizer.save_pretrained(target)
    # The BPE model's own files: its vocabulary holds no added tokens.
    tokenizer.backend_tokenizer.model.save(target)
    added_path = os.path.join(target, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path) as f:
            added = {k: v for k, v in json.load(f).items() if v < vocab_size}
        if added:
            write_json(added_path, added)
        else:
            os.remove(added_path)
    json_path = os.path.join(target, "tokenizer.json")
    if os.path.isfile(json_path):
        with open(json_path) as f:
            data = json.load(f)
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
        write_json(json_path, data)
    config_path = os.path.join(target, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    decoder = config.get("added_tokens_decoder", {})
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
    write_json(config_path, config)


def export_pipeline(
    model: models.StableDiffusion,
    params: Params,
    output_dir: str,
    *,
    scope: scope_lib.Scope,
    base_dir: str | None = None,
    torch_dtype: str = "float32",
) -> str:
    """Writes `model` with `params` as a PyTorch diffusers pipeline folder.

    Args:
      model: the model the params belong to (after `scope.make_scope`, so a textual-
        inversion model has the placeholder in its tokenizer).
      params: full parameters `{"unet", "vae", "text_encoder"}`: `scope.export_params`
        of the trained and frozen trees.
      output_dir: the folder to write; created, and must be empty if it exists.
      scope: what trained; its `trained_components()` are converted, the rest copied,
        and its `token_id` row (if any) is written as an embeddings file.
      base_dir: the local diffusers folder the run started from (`weights.
        resolve_pretrained`), whose untouched components are copied; None for a tiny
        model, whose components are all converted.
      torch_dtype: "float32" or "float16" for the converted weights.

    Returns:
      `output_dir`.

    Raises:
      errors.AlreadyExists: `output_dir` is not empty.
      ValueError: unknown scope or dtype, or a converted state dict that does not match the
        PyTorch class (names the tensors).
    """
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise errors.AlreadyExists(
            f"export directory {output_dir} exists and is not empty: name a new or empty "
            "folder (--output)"
        )
    dtype = TORCH_DTYPES[torch_dtype]
    table_rows = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"][
        "embedding"
    ].shape[0]
    if any(p[-1] == lora.A_NAME for c in params for p in flatten_dict(params[c])):
        raise ValueError(
            "LoRA adapters are attached, not merged: pass scope.export_params (for LoRA, "
            "LoraScope.merged_params)"
        )
    trained = scope.trained_components()
    vocab_size = table_rows if scope.token_id is None else scope.token_id
    if scope.token_ids and scope.token_ids[-1] != table_rows - 1:
        raise ValueError(
            f"placeholder ids {scope.token_ids} are not the last of {table_rows} embedding rows"
        )
    os.makedirs(output_dir, exist_ok=True)

    text_params = params["text_encoder"]
    if vocab_size != table_rows:  # Drop the placeholder row: the base text encoder.
        embeddings = text_params["text_model"]["embeddings"]
        table = embeddings["token_embedding"]["embedding"]
        text_params = {
            **text_params,
            "text_model": {
                **text_params["text_model"],
                "embeddings": {**embeddings, "token_embedding": {"embedding": table[:vocab_size]}},
            },
        }
    component_params = {"unet": params["unet"], "vae": params["vae"], "text_encoder": text_params}
    sources = {}
    for component in weights.COMPONENTS:
        base_files = _base_files(base_dir, component)
        if component not in trained and _copyable(component, base_files):
            _copy_component(base_dir, component, output_dir, base_files)
            sources[component] = "copied"
        else:
            _write_component(
                model,
                component,
                component_params[component],
                output_dir,
                base_files,
                dtype,
                vocab_size,
            )
            sources[component] = "converted"

    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    base_tokenizer = os.path.join(base_dir, "tokenizer") if base_dir else None
    # Copied only in transformers 4's layout (vocab.json, merges.txt), which transformers
    # 4 and 5 both read; a transformers-5 tokenizer.json is written in that layout.
    if base_tokenizer and os.path.isfile(os.path.join(base_tokenizer, "vocab.json")):
        shutil.copytree(base_tokenizer, tokenizer_dir)
    else:
        _save_base_tokenizer(model.tokenizer, tokenizer_dir, vocab_size)
    saved = clip_tokenizer.load(tokenizer_dir)
    if len(saved) != vocab_size:  # E.g. a base folder that is not the run's base model.
        raise ValueError(
            f"{tokenizer_dir}: tokenizer has {len(saved)} tokens but the exported text "
            f"encoder has {vocab_size} embedding rows"
        )

    scheduler = dict(model.scheduler_config)
    if "_class_name" not in scheduler:
        scheduler.update(DEFAULT_SCHEDULER)
    write_json(os.path.join(output_dir, "scheduler", "scheduler_config.json"), scheduler)

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        **{name: list(cls) for name, cls in TORCH_CLASSES.items()},
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    write_json(os.path.join(output_dir, "model_index.json"), index)

    if scope.token_ids:
        placeholders = model.tokenizer.convert_ids_to_tokens(list(scope.token_ids))
        table = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
        save_learned_tokens(output_dir, placeholders, table[vocab_size:])
    logging.info("exported %s scope to %s (%s)", scope.name, output_dir, sources)
    return output_dir


def export_run(
    workdir: str,
    output_dir: str,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    torch_dtype: str = "float32",
    ema: bool | None = None,
) -> str:
    """Exports checkpoint `step` (newest if None) of the run in `workdir`.

    Rebuilds the model and scope from the run's saved config (or `config`) as
    `train.setup` does, checks the rebuilt frozen parameters against the fingerprint the
    checkpoint holds (they are rebuilt, not saved), restores the trainable parameters (or
    their EMA: `ema` as in `runs.load_trained`, by default the EMA when the run kept one)
    and exports their merge, copying untouched components from the pretrained folder.
    """
    from nsync_jax import runs  # The exporter itself does not need orbax.

    run = runs.load_trained(workdir, step, config, ema=ema)
    if jax.process_count() > 1:
        # Every process takes part in gathering the arrays (a collective); one writes.
        trainable, frozen = jax.tree.map(to_numpy, (run.trainable, run.frozen))
        run = dataclasses.replace(run, trainable=trainable, frozen=frozen)
        if jax.process_index() != 0:
            return output_dir
    config, model, scope = run.config, run.model, run.scope
    logging.info(
        "exporting step %d of %s (%s scope, %s weights) to %s",
        run.step,
        workdir,
        scope.name,
        "EMA" if run.ema else "raw",
        output_dir,
    )
    base_dir = None
    if config.model.source == "pretrained":
        base_dir = weights.resolve_pretrained(config.model)
    if isinstance(scope, scope_lib.LoraScope):
        # The LoRA file (and token) in `output_dir`; optionally the merged pipeline inside.
        lora_export.export_lora(
            model,
            scope,
            run.trainable,
            output_dir,
            layout=config.lora.export_layout,
            fold_alpha=config.lora.fold_alpha,
        )
        if not config.lora.export_merged:
            return output_dir
        export_pipeline(
            model,
            scope.export_params(run.trainable, run.frozen),
            os.path.join(output_dir, "merged"),
            scope=scope,
            base_dir=base_dir,
            torch_dtype=torch_dtype,
        )
        return output_dir
    return export_pipeline(
        model,
        scope.export_params(run.trainable, run.frozen),
        output_dir,
        scope=scope,
        base_dir=base_dir,
        torch_dtype=torch_dtype,
    )
