"""Writing trained LoRA adapters as the `.safetensors` files PyTorch tools load.

Two layouts of `pytorch_lora_weights.safetensors` (module paths from `weights.torch_key`):

- `peft` (what `StableDiffusionPipeline.load_lora_weights` of current diffusers reads
  natively, and what its own LoRA scripts write):
      unet.<module>.lora_A.weight            [r, in]        conv: [r, in, kh, kw]
      unet.<module>.lora_B.weight            [out, r]       conv: [out, r, 1, 1]
      text_encoder.encoder.layers.N.self_attn.q_proj.lora_A.weight ...
  This layout has no per-layer `.alpha` key (the loader rejects one); alpha and the
  targets go in the header as `lora_adapter_metadata` (JSON of `unet.r`,
  `unet.lora_alpha`, `unet.target_modules`, ... as diffusers writes it), or, with
  `fold_alpha`, alpha/r is multiplied into B and no metadata is needed.
- `kohya` (what A1111 and ComfyUI users load; diffusers converts it on load):
      lora_unet_<module with . -> _>.lora_down.weight / .lora_up.weight / .alpha
      lora_te_text_model_encoder_layers_N_self_attn_q_proj.lora_down.weight ...

For pivotal tuning (`lora_ti`) the token goes to `learned_embeds.safetensors` as
`{placeholder: [1, D]}` by `torch_files.save_learned_tokens`, as for textual inversion, for
`pipe.load_textual_inversion(dir)` after `pipe.load_lora_weights(dir)` (several styles'
tokens: one file each, listed in `textual_inversion.json`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from nsync_jax import lora, models, weights
from nsync_jax import scope as scope_lib
from nsync_jax.torch_files import save_learned_tokens, to_numpy

Params = dict[str, Any]

LORA_FILE = "pytorch_lora_weights.safetensors"
LAYOUTS = ("peft", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight, lora_B.weight) in PyTorch layout from Flax-layout `lora_a`, `lora_b`.

    Dense: a [in, r] -> A [r, in]; b [r, out] -> B [out, r]. Conv: a [kh, kw, in, r] ->
    A [r, in, kh, kw] (the base conv's kernel), b -> B [out, r, 1, 1] (a 1x1 conv).
    """
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1)), np.ascontiguousarray(
            b.T[:, :, None, None]
        )
    if a.ndim == 2:
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    raise ValueError(f"lora_a of rank {a.ndim}: expected a Dense (2-D) or Conv (4-D) adapter")


def adapter_layers(adapters: Params) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(component, PyTorch module path, A, B) per adapted layer, PyTorch layout, float32."""
    for component in sorted(adapters):
        layers = flatten_dict(adapters[component], is_leaf=lambda _, v: lora.A_NAME in v)
        for path in sorted(layers):
            layer = layers[path]
            a = to_numpy(layer[lora.A_NAME]).astype(np.float32)
            b = to_numpy(layer[lora.B_NAME]).astype(np.float32)
            yield (component, lora.module_name(path), *torch_factors(a, b))


def peft_state_dict(
    adapters: Params, settings: lora.LoraSettings, fold_alpha: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The `peft` layout: (tensors, safetensors header metadata).

    Without `fold_alpha` the header carries each component's LoRA config (r, alpha, the
    exact target module paths) so the loader scales by alpha/r; with it, B is scaled by
    alpha/r here and the loader's default (alpha = r, scale 1) is right.
    """
    state, targets = {}, {}
    scale_b = settings.scale if fold_alpha else 1.0
    for component, name, a, b in adapter_layers(adapters):
        if component == "text_encoder":  # transformers 5 names the modules without it.
            name = name.removeprefix(weights.TEXT_MODEL_PREFIX)
        state[f"{component}.{name}.lora_A.weight"] = a
        state[f"{component}.{name}.lora_B.weight"] = b * np.float32(scale_b)
        targets.setdefault(component, []).append(name)
    metadata = {"format": "pt"}
    if not fold_alpha:
        config = {}
        for component, names in targets.items():
            config.update(
                {
                    f"{component}.r": settings.rank,
                    f"{component}.lora_alpha": settings.alpha,
                    f"{component}.target_modules": sorted(names),
                    # diffusers reads these two fields unconditionally.
                    f"{component}.rank_pattern": {},
                    f"{component}.alpha_pattern": {},
                }
            )
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return state, metadata


def kohya_state_dict(adapters: Params, settings: lora.LoraSettings) -> dict[str, np.ndarray]:
    """The `kohya` layout: lora_down (A), lora_up (B) and a scalar `.alpha` per layer."""
    state = {}
    for component, name, a, b in adapter_layers(adapters):
        stem = KOHYA_PREFIXES[component] + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = a
        state[f"{stem}.lora_up.weight"] = b
        state[f"{stem}.alpha"] = np.asarray(settings.alpha, np.float32)
    return state


def save_lora_weights(
    adapters: Params,
    settings: lora.LoraSettings,
    output_dir: str,
    *,
    layout: str = "peft",
    fold_alpha: bool = False,
) -> str:
    """Writes `output_dir/pytorch_lora_weights.safetensors`; returns its path.

    Raises:
      ValueError: unknown layout, or `fold_alpha` with the kohya layout (which stores
        alpha per layer).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"lora.export_layout={layout!r}: expected one of {LAYOUTS}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LORA_FILE)
    if layout == "peft":
        state, metadata = peft_state_dict(adapters, settings, fold_alpha)
    else:
        if fold_alpha:
            raise ValueError("lora.fold_alpha is for the peft layout; kohya stores .alpha")
        state, metadata = kohya_state_dict(adapters, settings), {"format": "pt"}
    save_file(state, path, metadata=metadata)
    return path


def export_lora(
    model: models.StableDiffusion,
    scope: scope_lib.LoraScope,
    trainable: Params,
    output_dir: str,
    *,
    layout: str = "peft",
    fold_alpha: bool = False,
) -> str:
    """Writes the LoRA file and, for pivotal tuning, the learned token (`torch_files`).

    Args:
      model: the model after `scope.make_scope` (its tokenizer names the placeholder).
      scope: the `lora` or `lora_ti` scope that trained.
      trainable: the trained tree (`{"lora": ..., ["token_embedding": ...]}`).
      output_dir: folder to write into (created).
      layout: "peft" or "kohya".
      fold_alpha: peft only: multiply alpha/r into B instead of writing header metadata.

    Returns:
      `output_dir`.
    """
    save_lora_weights(
        trainable["lora"], scope.settings, output_dir, layout=layout, fold_alpha=fold_alpha
    )
    if scope.token_ids:
        placeholders = model.tokenizer.convert_ids_to_tokens(list(scope.token_ids))
        save_learned_tokens(output_dir, placeholders, trainable["token_embedding"])
    logging.info(
        "exported %d LoRA layers (%s layout) to %s",
        sum(1 for _ in adapter_layers(trainable["lora"])),
        layout,
        output_dir,
    )
    return output_dir
