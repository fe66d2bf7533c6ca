"""LoRA adapters on our Flax UNet and CLIP text encoder.

A targeted layer with kernel W (Dense `[in, out]`, Conv `[kh, kw, in, out]`) gets two
trainable factors, held in Flax layout next to nothing else:

    lora_a: [in, r]  (Conv: [kh, kw, in, r])     lora_b: [r, out]
    W' = W + (alpha / r) · lora_a @ lora_b      (contracting r; `delta_kernel`)

which is PyTorch PEFT's `W + (alpha/r) · B·A` with `A = lora_a^T` (`[r, in]`, conv
`[r, in, kh, kw]`) and `B = lora_b^T` (`[out, r]`, conv `[out, r, 1, 1]`), as
`lora_export.py` writes them. A starts random, B at zero, so training starts at the base.

Layers are chosen by their PyTorch module path (`weights.torch_key`), matched PEFT's way:
a target `to_q` matches every module whose path is `to_q` or ends in `.to_q`. Named groups
expand to module names (`TARGET_GROUPS`).

Adapters are applied in one of two ways (equal outputs and gradients):

- `merge` (functional): the targeted kernels are replaced by W' before `apply`. Since the
  scope's `merge` runs inside the differentiated loss, gradients reach A and B through W'.
- `intercept` (the name is kept for configs; nothing is intercepted): A and B sit in the
  parameter tree next to the kernel, and our Dense and Conv layers (`models/layers.py`)
  add `scale · (x A) B` to their output, never forming W'. The scale is a field of the
  UNet and text encoder modules: `with_adapter_scale` returns the model built with it, so
  `step.py` and the sampler need no change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from nsync_jax import models, weights

Params = dict[str, Any]
Path = tuple[str, ...]

# Components adapters may target, and the config field naming each one's targets.
COMPONENTS = ("unet", "text_encoder")
TARGET_GROUPS = {
    # diffusers' own LoRA script (train_text_to_image_lora.py): the attention projections.
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    # The transformer blocks' input and output projections (1x1 convs in SD 1.x).
    "proj": ("proj_in", "proj_out"),
    # The GEGLU feed-forward of every transformer block.
    "ff": ("ff.net.0.proj", "ff.net.2"),
    # LoCon: the ResNet convolutions.
    "resnet": ("conv1", "conv2", "conv_shortcut"),
    # The CLIP text encoder's attention projections.
    "text_attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
IMPLEMENTATIONS = ("merge", "intercept")
INITS = ("gaussian", "kaiming")
A_NAME, B_NAME = "lora_a", "lora_b"
# Adapters train in float32 whatever the base's dtype: they are small, and bf16 updates
# of a zero-initialised B would round away.
ADAPTER_DTYPE = jnp.float32


def expand_targets(spec: str) -> tuple[str, ...]:
    """Module names from a comma-separated list of names and `TARGET_GROUPS` keys."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for name in TARGET_GROUPS.get(item, (item,)):
            if name not in names:
                names.append(name)
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What the `lora` config group asks for, validated.

    Attributes:
      rank: r, the inner dimension of every adapter.
      alpha: the adapters' output is scaled by alpha / r.
      targets: module names per component, e.g. {"unet": ("to_q", ...), "text_encoder": ()}.
      init: "gaussian" (A ~ N(0, 1/r), diffusers' LoRA script) or "kaiming" (PEFT's default,
        uniform with bound 1/sqrt(fan_in)).
      implementation: "merge" or "intercept" (module docstring).
    """

    rank: int
    alpha: float
    targets: dict[str, tuple[str, ...]]
    init: str = "gaussian"
    implementation: str = "merge"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if self.init not in INITS:
            raise ValueError(f"lora.init={self.init!r}: expected one of {INITS}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"lora.implementation={self.implementation!r}: expected one of {IMPLEMENTATIONS}"
            )
        if set(self.targets) - set(COMPONENTS):
            raise ValueError(f"LoRA targets name unknown components {sorted(self.targets)}")
        if not any(self.targets.values()):
            raise ValueError("lora.unet_targets and lora.text_targets are both empty")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora_config: ml_collections.ConfigDict) -> LoraSettings:
        return cls(
            rank=lora_config.rank,
            alpha=float(lora_config.alpha),
            targets={
                "unet": expand_targets(lora_config.unet_targets),
                "text_encoder": expand_targets(lora_config.text_targets),
            },
            init=lora_config.init,
            implementation=lora_config.implementation,
        )


def module_name(module_path: Path) -> str:
    """PyTorch module path of the Flax module at `module_path` (the kernel's parent)."""
    return weights.torch_key((*module_path, "kernel")).removesuffix(".weight")


def matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule: the module path equals a target or ends in `.<target>`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(component_params: Params, targets: tuple[str, ...]) -> list[Path]:
    """Module paths (in Flax naming) of the Dense/Conv kernels `targets` select.

    Raises:
      ValueError: a target name that matches no layer (a typo would otherwise train
        nothing), naming it.
    """
    found, used = [], set()
    for path, leaf in flatten_dict(component_params).items():
        if path[-1] != "kernel" or leaf.ndim not in (2, 4):
            continue
        name = module_name(path[:-1])
        hits = {t for t in targets if name == t or name.endswith("." + t)}
        if hits:
            found.append(path[:-1])
            used |= hits
    unused = [t for t in targets if t not in used]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no Dense or Conv layer")
    return found


def _init_a(rng: np.random.Generator, shape: tuple[int, ...], init: str, rank: int) -> np.ndarray:
    if init == "gaussian":
        return rng.standard_normal(shape, np.float32) / np.float32(rank)
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))  # torch's kaiming_uniform(a=sqrt(5)).
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def init_adapters(params: Params, settings: LoraSettings, seed: int) -> Params:
    """`{component: {<module path>: {"lora_a", "lora_b"}}}` for every targeted layer.

    A is drawn on the host (NumPy, layer by layer in sorted path order, from `seed`):
    hundreds of small eager JAX draws would compile once per shape.
    """
    rng = np.random.default_rng(seed)
    adapters = {}
    for component in COMPONENTS:
        targets = settings.targets.get(component, ())
        if not targets:
            continue
        flat = flatten_dict(params[component])
        layers = {}
        for path in sorted(find_targets(params[component], targets)):
            shape = flat[(*path, "kernel")].shape
            a = _init_a(rng, (*shape[:-1], settings.rank), settings.init, settings.rank)
            layers[(*path, A_NAME)] = jnp.asarray(a)
            layers[(*path, B_NAME)] = jnp.zeros((settings.rank, shape[-1]), ADAPTER_DTYPE)
        adapters[component] = unflatten_dict(layers)
    return adapters


def delta_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B in the kernel's Flax layout: `[..., in, r] x [r, out] -> [..., in, out]`."""
    return jnp.einsum("...r,ro->...o", a, b)


def merge_component(component_params: Params, adapters: Params, scale: float) -> Params:
    """Params with each adapted kernel replaced by W + scale · A B (differentiable in A, B).

    W' is held in the adapters' dtype (float32): a bf16 W' would round small updates away.
    """
    flat = dict(flatten_dict(component_params))
    for path, layer in flatten_dict(adapters, is_leaf=lambda _, v: A_NAME in v).items():
        kernel = flat[(*path, "kernel")]
        delta = delta_kernel(layer[A_NAME], layer[B_NAME])
        flat[(*path, "kernel")] = kernel.astype(delta.dtype) + scale * delta
    return unflatten_dict(flat)


def attach_component(component_params: Params, adapters: Params) -> Params:
    """Params with `lora_a`/`lora_b` leaves next to each adapted kernel (for `intercept`)."""
    flat = dict(flatten_dict(component_params))
    for path, value in flatten_dict(adapters).items():
        if path[:-1] + ("kernel",) not in flat:
            raise ValueError(f"LoRA adapter {'/'.join(path)} has no kernel to adapt")
        flat[path] = value
    return unflatten_dict(flat)


def apply_adapters(params: Params, adapters: Params, settings: LoraSettings) -> Params:
    """Full params for `apply`: adapters merged into kernels, or attached for `intercept`."""
    out = dict(params)
    for component, tree in adapters.items():
        if settings.implementation == "merge":
            out[component] = merge_component(params[component], tree, settings.scale)
        else:
            out[component] = attach_component(params[component], tree)
    return out


def merged_params(params: Params, adapters: Params, settings: LoraSettings) -> Params:
    """Params with the adapters folded into the kernels (for export, whatever the
    implementation trained with)."""
    return {
        **params,
        **{c: merge_component(params[c], t, settings.scale) for c, t in adapters.items()},
    }


def with_adapter_scale(model: models.StableDiffusion, scale: float) -> models.StableDiffusion:
    """The model whose UNet and text encoder add `scale · (x A) B` wherever adapters are
    attached to a layer's kernel (the `intercept` implementation)."""
    return dataclasses.replace(
        model,
        unet=model.unet.clone(lora_scale=scale),
        text_encoder=model.text_encoder.clone(lora_scale=scale),
    )


def count(adapters: Params) -> int:
    """Number of adapter parameters."""
    return int(sum(x.size for x in jax.tree.leaves(adapters)))
