"""Loading pretrained Stable Diffusion weights into our Flax modules (`nsync_jax/models/`).

A diffusers folder (local, or a hub id fetched with `huggingface_hub.snapshot_download`)
holds `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/`. Our modules are
built from the components' `config.json` (`UNetConfig`, `VAEConfig`, `CLIPTextConfig`,
which refuse a field value they do not implement); their weights come from PyTorch `.safetensors`
(safetensors' NumPy API), PyTorch `.bin` (`torch_pickle`) or Flax `.msgpack` files, in
that order, optionally of a variant (`*.fp16.*`): no torch at run time. Folders written
by transformers 4 and 5 both load: the tokenizer through `clip_tokenizer`, the text
encoder's keys with or without their `text_model.` prefix (`stored_key_rule`).

PyTorch and Flax name the same tensor differently. One rule, `torch_key`, maps every Flax
parameter path to its PyTorch state-dict key, and `to_flax_layout` / `to_torch_layout`
move the tensor between the two layouts; loading and `export.py` both use them, so the
two directions cannot drift apart:

    Flax                                        PyTorch
    down_blocks_0/attentions_0/.../to_out_0     down_blocks.0.attentions.0....to_out.0
    encoder/mid_block/attentions_0/query        encoder.mid_block.attentions.0.to_q  (VAE)
    text_model/encoder/layers/0/...             text_model.encoder.layers.0....
    kernel (conv, HWIO)                         weight (OIHW)
    kernel (dense, in x out)                    weight (out x in)
    scale (norm), embedding                     weight
    bias                                        bias

Every Flax parameter must be found with the expected shape and every tensor in the file
must be used: a missing, unexpected or misshapen tensor is an error naming it, never a
silently random-initialised parameter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.core
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open

from nsync_jax import clip_tokenizer, errors, models, torch_pickle, trees, unet_memory
from nsync_jax.models import clip
from nsync_jax.models import unet as unet_lib
from nsync_jax.models import vae as vae_lib

Params = dict[str, Any]
Path = tuple[str, ...]
ShardingsFn = Callable[[Params], Any]

COMPONENTS = ("unet", "vae", "text_encoder")

# Weight file names per component and format, in the order they are looked for: PyTorch
# safetensors, PyTorch pickle (`torch.save`), Flax msgpack; diffusers' names for the UNet
# and VAE, transformers' for CLIP.
WEIGHT_FILES = {
    "unet": {
        "safetensors": "diffusion_pytorch_model.safetensors",
        "bin": "diffusion_pytorch_model.bin",
        "flax": "diffusion_flax_model.msgpack",
    },
    "vae": {
        "safetensors": "diffusion_pytorch_model.safetensors",
        "bin": "diffusion_pytorch_model.bin",
        "flax": "diffusion_flax_model.msgpack",
    },
    "text_encoder": {
        "safetensors": "model.safetensors",
        "bin": "pytorch_model.bin",
        "flax": "flax_model.msgpack",
    },
}
FORMATS = ("safetensors", "bin", "flax")
TORCH_FORMATS = ("safetensors", "bin")
# transformers 4 names CLIP text-encoder tensors `text_model.*` (as `torch_key` does);
# transformers 5 saves them without the prefix.
TEXT_MODEL_PREFIX = "text_model."

# Flax names the i-th module of a list `<list>_<i>`; PyTorch nests it as `<list>.<i>`.
# Listed explicitly: `time_embedding.linear_1` keeps its underscore in PyTorch too.
_LIST_MODULES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "attentions",
        "resnets",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "net",
        "to_out",
    }
)
# Our VAE's mid-block attention keeps the pre-0.14 diffusers names (the parameter tree
# checkpoints hold); PyTorch renamed them.
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Older PyTorch VAE checkpoints still use those old names; diffusers renames them at load.
_LEGACY_TORCH = {
    ".to_q.": ".query.",
    ".to_k.": ".key.",
    ".to_v.": ".value.",
    ".to_out.0.": ".proj_attn.",
}
# Buffers (not parameters) some PyTorch checkpoints store, e.g. older CLIP text encoders.
_TORCH_BUFFERS = re.compile(r"(^|\.)position_ids$")
_FLAX_LEAVES = ("kernel", "scale", "embedding", "bias")

# ---------------------------------------------------------------------------------------
# Names and layouts, shared with export.py.


def torch_key(path: Path) -> str:
    """The PyTorch state-dict key of the Flax parameter at `path`."""
    *modules, leaf = path
    if leaf not in _FLAX_LEAVES:
        raise ValueError(f"Flax parameter {'/'.join(path)} has an unknown leaf name {leaf!r}")
    parts = []
    for name in modules:
        if name in _VAE_ATTENTION:
            parts.append(_VAE_ATTENTION[name])
            continue
        base, sep, index = name.rpartition("_")
        if sep and index.isdigit() and base in _LIST_MODULES:
            parts += [base, index]
        else:
            parts.append(name)
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the PyTorch tensor holding a Flax leaf of `flax_shape`."""
    if leaf == "kernel" and len(flax_shape) == 4:  # HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if leaf == "kernel" and len(flax_shape) == 2:  # (in, out) -> (out, in)
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax leaf named `leaf`."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """A Flax leaf in PyTorch layout (contiguous, as safetensors writes it)."""
    if leaf == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and array.ndim == 2:
        array = array.T
    return np.ascontiguousarray(array)


def is_torch_buffer(key: str) -> bool:
    """Whether `key` is a non-parameter buffer some checkpoints store (ignored)."""
    return bool(_TORCH_BUFFERS.search(key))


def _legacy_torch_key(key: str) -> str | None:
    for new, old in _LEGACY_TORCH.items():
        if new in key:
            return key.replace(new, old)
    return None


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else f" ({len(names)})"
    return shown + more


def mismatch_error(
    source: str, missing: list[str], unexpected: list[str], misshapen: list[str]
) -> errors.ConfigError:
    """One error naming (the first few of) each kind of mismatched tensor."""
    problems = []
    if missing:
        problems.append(f"missing {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {_describe(unexpected)}")
    if misshapen:
        problems.append(f"wrong shape {_describe(misshapen)}")
    return errors.ConfigError(f"{source} does not match the model: " + "; ".join(problems))


def same_key(key: str) -> str:
    """The identity: a file that names tensors as `torch_key` does."""
    return key


def _without_text_model_prefix(key: str) -> str:
    return key.removeprefix(TEXT_MODEL_PREFIX)


def stored_key_rule(component: str, keys: Iterable[str]) -> Callable[[str], str]:
    """How a file holding `keys` names the tensor that `torch_key` names.

    The one place where layouts differ: transformers 5 saves a CLIP text encoder without
    the `text_model.` prefix (`final_layer_norm.weight` for `torch_key`'s
    `text_model.final_layer_norm.weight`). Every other file uses `torch_key`'s names.
    """
    if component == "text_encoder" and not any(k.startswith(TEXT_MODEL_PREFIX) for k in keys):
        return _without_text_model_prefix
    return same_key


def match_torch_keys(
    source: str,
    expected: Mapping[Path, Any],
    available: Mapping[str, tuple[int, ...]],
    stored_key: Callable[[str], str] = same_key,
) -> dict[Path, str]:
    """Maps each expected Flax path to its key among `available` PyTorch tensors.

    Args:
      source: what `available` came from, for error messages.
      expected: flat Flax parameters (anything with `.shape`) by path.
      available: PyTorch tensor shapes by key, as the file names them.
      stored_key: the file's name for a `torch_key` name (`stored_key_rule`).

    Raises:
      errors.ConfigError: naming, with the file's key names, the missing, unexpected
        (buffers aside) and misshapen tensors.
    """
    found, wanted = {}, {}
    for path, leaf in expected.items():
        key = stored_key(torch_key(path))
        if key not in available and _legacy_torch_key(key) in available:
            key = _legacy_torch_key(key)
        found[path] = key
        wanted[key] = torch_shape(path[-1], tuple(leaf.shape))
    stored = {k: tuple(v) for k, v in available.items() if k in wanted or not is_torch_buffer(k)}
    differences = trees.diff(wanted, stored)
    if differences:
        raise mismatch_error(
            source,
            differences.missing,
            sorted(differences.unexpected),
            [f"{k} {stored[k]} (expected {wanted[k]})" for k in differences.misshapen],
        )
    return found


# ---------------------------------------------------------------------------------------
# Weight files.


def variant_name(name: str, variant: str) -> str:
    """`name` of weight `variant`, as diffusers and transformers write it.

    The variant goes before the last extension: `model.fp16.safetensors`,
    `pytorch_model.bin.index.fp16.json`.
    """
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_files(directory: str, component: str, fmt: str, variant: str = "") -> list[str]:
    """A component's files in `fmt`: the single file, or the shards its index names.

    Returns [] when the folder has neither.
    """
    name = WEIGHT_FILES[component][fmt]
    single = os.path.join(directory, variant_name(name, variant))
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, variant_name(name + ".index.json", variant))
    if fmt != "flax" and os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, shard) for shard in shards]
    return []


def find_weights(directory: str, component: str, variant: str = "") -> tuple[str, list[str]]:
    """(format, files) of a component folder: the first of `FORMATS` it holds.

    PyTorch safetensors, then PyTorch `.bin` (read without torch: `torch_pickle`), then
    Flax msgpack; `variant` ("fp16") picks the `*.fp16.*` files of each.

    Raises:
      errors.NotFound: naming the folder and the file names looked for.
    """
    for fmt in FORMATS:
        files = weight_files(directory, component, fmt, variant)
        if files:
            return fmt, files
    names = [variant_name(WEIGHT_FILES[component][fmt], variant) for fmt in FORMATS]
    raise errors.NotFound(
        f"no {component} weights in {os.path.abspath(directory)}: looked for "
        f"{', '.join(names)} (and the PyTorch ones' .index.json shards)"
    )


@contextlib.contextmanager
def open_torch_files(
    files: list[str],
) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], np.ndarray]]]:
    """(shapes by key, read(key)) over all shards of a safetensors or `.bin` checkpoint.

    Shapes come from the safetensors headers or the `.bin` pickles; `read` reads one
    tensor as NumPy (safetensors' NumPy API, `torch_pickle`): torch is never imported.
    """
    with contextlib.ExitStack() as stack:
        shapes, readers = {}, {}
        for name in files:
            if name.endswith(".safetensors"):
                handle = stack.enter_context(safe_open(name, framework="np"))
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
                    readers[key] = handle.get_tensor
            else:
                checkpoint = stack.enter_context(torch_pickle.TorchFile(name))
                shapes.update(checkpoint.shapes())
                readers.update(dict.fromkeys(checkpoint.keys(), checkpoint.read))
        yield shapes, lambda key: readers[key](key)


def torch_file_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors or `.bin` checkpoint, without reading the tensors."""
    with open_torch_files(files) as (shapes, _):
        return shapes


def _place(array: np.ndarray, dtype: jnp.dtype, sharding: Any) -> jax.Array:
    if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
        array = array.astype(dtype)
    if sharding is None:
        return jnp.asarray(array)
    # Each device (and each host) builds only its own shard; no replicated full copy.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_component_params(
    directory: str,
    component: str,
    expected: Params,
    param_dtype: jnp.dtype,
    shardings: Any = None,
    variant: str = "",
) -> Params:
    """Reads one component's weights into the tree structure of `expected`.

    Args:
      directory: the component folder, e.g. `<pipeline>/unet`.
      component: "unet", "vae" or "text_encoder" (picks the file names).
      expected: the Flax parameter tree as shapes (from `jax.eval_shape` of the init).
      param_dtype: dtype of the floating parameters returned.
      shardings: a tree of shardings like `expected`, or None for the default device.
      variant: weight file variant, e.g. "fp16" for `*.fp16.safetensors`.

    Raises:
      errors.NotFound: no weight file.
      errors.ConfigError: a missing, unexpected or misshapen tensor (named).
    """
    fmt, files = find_weights(directory, component, variant)
    flat_expected = flatten_dict(flax.core.unfreeze(expected))
    flat_shardings = flatten_dict(flax.core.unfreeze(shardings)) if shardings is not None else {}
    source = ", ".join(files)
    flat = {}
    if fmt in TORCH_FORMATS:
        with open_torch_files(files) as (shapes, read):
            stored_key = stored_key_rule(component, shapes)
            keys = match_torch_keys(source, flat_expected, shapes, stored_key)
            for path, key in keys.items():
                array = to_flax_layout(path[-1], read(key))
                flat[path] = _place(array, param_dtype, flat_shardings.get(path))
    else:
        with open(files[0], "rb") as f:
            stored = flatten_dict(flax.serialization.msgpack_restore(f.read()))
        wanted = {p: tuple(leaf.shape) for p, leaf in flat_expected.items()}
        differences = trees.diff(wanted, {p: np.shape(v) for p, v in stored.items()})
        if differences:
            raise mismatch_error(
                source,
                ["/".join(p) for p in differences.missing],
                ["/".join(p) for p in differences.unexpected],
                [
                    f"{'/'.join(p)} {np.shape(stored[p])} (expected {wanted[p]})"
                    for p in differences.misshapen
                ],
            )
        for path in flat_expected:
            flat[path] = _place(np.asarray(stored.pop(path)), param_dtype, flat_shardings.get(path))
    return unflatten_dict(flat)


# ---------------------------------------------------------------------------------------
# Modules from config files.


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise errors.NotFound(
            f"{os.path.abspath(path)} not found (is this a diffusers pipeline folder?)"
        )
    with open(path) as f:
        return json.load(f)


def load_modules(directory: str, model_config: ml_collections.ConfigDict) -> models.StableDiffusion:
    """Our modules, the tokenizer and the scheduler config of a local diffusers folder.

    Reads configs and the tokenizer (either layout, `clip_tokenizer.load`), no weights.

    Raises:
      errors.NotFound: a config file or the tokenizer is missing.
      errors.ConfigError: a config our modules do not implement (naming the file and the
        field), a tokenizer that does not fit the text encoder, a `model.resolution` the
        model cannot divide, or an attention/remat option that is unknown or unavailable on
        this backend.
    """
    unet_memory.MemoryOptions.from_config(model_config)  # Refused before any file is read.
    configs = {}
    for component, parse in (
        ("unet", unet_lib.UNetConfig.from_dict),
        ("vae", vae_lib.VAEConfig.from_dict),
        ("text_encoder", clip.CLIPTextConfig.from_dict),
    ):
        path = os.path.join(directory, component, "config.json")
        try:
            configs[component] = parse(_read_json(path))
        except errors.ConfigError as e:
            raise errors.ConfigError(f"{os.path.abspath(path)}: {e}") from e
    tokenizer = clip_tokenizer.load(os.path.join(directory, "tokenizer"))
    if len(tokenizer) != configs["text_encoder"].vocab_size:
        raise errors.ConfigError(
            f"{directory}: tokenizer has {len(tokenizer)} tokens but the text encoder's "
            f"vocab_size is {configs['text_encoder'].vocab_size}"
        )
    scheduler_config = _read_json(os.path.join(directory, "scheduler", "scheduler_config.json"))
    return models.build(
        model_config,
        configs["unet"],
        configs["vae"],
        configs["text_encoder"],
        tokenizer,
        scheduler_config,
    )


def param_shapes(model: models.StableDiffusion, param_dtype: jnp.dtype) -> Params:
    """Every component's parameter tree as `jax.ShapeDtypeStruct`s, in `param_dtype`."""
    shapes = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0))

    def in_dtype(x):
        dtype = param_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype)

    return jax.tree.map(in_dtype, shapes)


# ---------------------------------------------------------------------------------------
# Entry points.


# Fetched from the hub with the first weights: everything but the weights.
HUB_CONFIGS = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    *(f"{component}/config.json" for component in COMPONENTS),
)
HUB_EXAMPLE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _hub_patterns(components: list[str], fmt: str, variant: str) -> list[str]:
    """The hub files of `components`' weights in `fmt`: one file, or an index and shards."""
    patterns = []
    for component in components:
        name = WEIGHT_FILES[component][fmt]
        patterns.append(f"{component}/{variant_name(name, variant)}")
        if fmt != "flax":
            stem, ext = name.rsplit(".", 1)
            variant_stem = f"{stem}.{variant}" if variant else stem
            patterns += [
                f"{component}/{variant_name(name + '.index.json', variant)}",
                f"{component}/{variant_stem}-*-of-*.{ext}",  # model.fp16-00001-of-00002.bin
            ]
    return patterns


def _hub_failure(error: Exception, revision: str | None) -> str:
    """Why the hub gave no snapshot, in our words: the client's own text speaks of its cache
    and "your internet connection" whatever the cause."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return "not in the local hub cache, and HF_HUB_OFFLINE is set: the hub was not asked"
        return "not in the local hub cache, and the hub could not be reached"
    if isinstance(error, hub_errors.GatedRepoError):
        return "the hub model is gated: accept its terms on its page, then `hf auth login`"
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return "the hub has no such model (or it is private: `hf auth login`)"
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return f"the hub model has no revision {revision!r} (model.revision)"
    if isinstance(error, hub_errors.HFValidationError):
        return "not a valid hub id"
    lines = str(error).strip().splitlines()
    return f"the hub download failed: {type(error).__name__}: {lines[0] if lines else ''}"


def resolve_pretrained(model_config: ml_collections.ConfigDict) -> str:
    """A local folder for `model.pretrained`: the folder itself, or a hub snapshot.

    A name shaped like a hub id (`owner/name`) goes to the hub unless its first part is a
    local folder (then it is a mistyped path). From the hub come the configs, the
    tokenizer and each component's weights in the first of `FORMATS` the repo has
    (safetensors, then `.bin`, then Flax msgpack): one download per format, for the
    components still lacking weights.

    Raises:
      errors.NotFound: no such folder (named as an absolute path) and, for a hub id,
        the hub's reason it was not found.
    """
    pretrained = model_config.pretrained
    name = os.path.expanduser(pretrained)
    if os.path.isdir(name):
        return name
    where = os.path.abspath(name)
    if name.startswith((".", "/")) or name.count("/") != 1:
        raise errors.NotFound(
            f"model.pretrained={pretrained!r} is neither a folder nor a hub id like "
            f"{HUB_EXAMPLE!r}: no folder {where}"
        )
    parent = name.split("/")[0]
    if os.path.isdir(parent):
        raise errors.NotFound(
            f"model.pretrained={pretrained!r}: no folder {where} (taken as a path, not a hub "
            f"id, since {os.path.abspath(parent)} exists)"
        )
    import huggingface_hub  # Only hub runs need it.

    revision = model_config.revision or None
    variant = model_config.variant
    directory, lacking = None, list(COMPONENTS)
    for fmt in FORMATS:
        patterns = _hub_patterns(lacking, fmt, variant)
        if directory is None:
            try:
                directory = huggingface_hub.snapshot_download(
                    name, revision=revision, allow_patterns=[*HUB_CONFIGS, *patterns]
                )
            # The hub's errors are OSErrors (not found, offline, HTTP) or ValueErrors (an
            # id it cannot take).
            except (OSError, ValueError) as e:
                raise errors.NotFound(
                    f"model.pretrained={pretrained!r} is neither a folder nor a hub model: "
                    f"tried the folder {where} (none there) and the hub id {name!r} "
                    f"({_hub_failure(e, revision)})"
                ) from e
        else:
            directory = huggingface_hub.snapshot_download(
                name, revision=revision, allow_patterns=patterns
            )
        lacking = [
            c for c in lacking if not weight_files(os.path.join(directory, c), c, fmt, variant)
        ]
        if not lacking:
            break
    return directory


def load_pretrained(
    model_config: ml_collections.ConfigDict, shardings_fn: ShardingsFn | None = None
) -> tuple[models.StableDiffusion, Params]:
    """Loads UNet, VAE, text encoder, tokenizer and scheduler config of `model.pretrained`.

    Args:
      model_config: the `model` config group (`pretrained`, `revision`, `variant`,
        `param_dtype`, `compute_dtype`, `resolution`).
      shardings_fn: maps the parameter tree of `jax.ShapeDtypeStruct`s to a tree of
        shardings (e.g. `lambda t: sharding.tree_shardings(mesh, t)`); each parameter is
        then built shard by shard on its devices. None puts them on the default device.

    Returns:
      The model and `{"unet", "vae", "text_encoder"}` parameters in `model.param_dtype`.
    """
    directory = resolve_pretrained(model_config)
    model = load_modules(directory, model_config)
    param_dtype = models.dtype_from_name(model_config.param_dtype)
    shapes = param_shapes(model, param_dtype)
    shardings = shardings_fn(shapes) if shardings_fn is not None else None
    params = {
        component: load_component_params(
            os.path.join(directory, component),
            component,
            shapes[component],
            param_dtype,
            shardings[component] if shardings is not None else None,
            model_config.variant,
        )
        for component in COMPONENTS
    }
    logging.info("loaded %s (%s parameters)", directory, model_config.param_dtype)
    return model, params
