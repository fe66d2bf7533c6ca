"""How the UNet attends and what its backward pass keeps: `model.attention`,
`model.remat` and `model.remat_policy`, validated here and passed to our UNet
(`models/unet.py`) as module fields.

Attention (`model.attention`) is softmax(Q Kᵀ · dim_head^-0.5) V in every attention of the
UNet (self- and cross-attention), computed by one of the kernels of `models/layers.py`:

- `xla` (default): plain einsums. Holds the [batch, heads, T, S] score matrix, in the
  forward pass and for the backward pass: at 512 px that is the largest activation.
- `dot_product`: `jax.nn.dot_product_attention`. On NVIDIA GPUs with bfloat16/float16
  activations and a head width that is a multiple of 8 and at most 128, it runs cuDNN's
  flash attention (`implementation="cudnn"`): no score matrix in memory, the fastest
  choice on GPU. Otherwise (float32, CPU, TPU, SD 1.5's 160-wide heads at the two deepest
  levels) it is XLA's attention, the same math as `xla`. Nothing is cast: float32 stays
  exact and gets no flash attention (set `model.compute_dtype` to bfloat16 for it).
- `chunked`: queries and keys in chunks with a running softmax under `jax.checkpoint`
  (Rabe & Staats 2021, https://arxiv.org/abs/2112.05682), so the full score matrix never
  exists. Any backend; slower than `xla`, a way to fit large images where no flash kernel
  exists.
- `splash`: the Pallas TPU splash-attention kernel, TPU only (an error elsewhere, raised when
  the model is built). Sequences are padded to the kernel's blocks (padded keys masked by
  segment ids) and head widths to 128 lanes, as MaxDiffusion does.

Every kernel reads the same `to_q`/`to_k`/`to_v`/`to_out_0` parameters: the parameter tree
is the same for every option, and LoRA adapters (a property of our Dense layers) compose
with all of them.

Rematerialisation (`model.remat`) trades compute for memory in the backward pass:

- `none` (default): every activation the backward pass needs is kept.
- `blocks`: each UNet down, mid and up block is a `flax.linen.remat` unit (MaxDiffusion's
  choice): only block inputs are kept and each block's forward runs again in the backward
  pass, about one third more compute for a large cut in activation memory.
- `full`: `jax.checkpoint` around the whole UNet call: only its inputs are kept, the least
  memory and the UNet forward runs twice.

`model.remat_policy` names a `jax.checkpoint_policies` policy (e.g.
`dots_with_no_batch_dims_saveable`: keep the matmul outputs, recompute the cheap
element-wise work) that decides what a remat unit may still keep; "" keeps nothing.

When to use what: start with the defaults. On GPU in bfloat16 use `dot_product`; on TPU
`splash`; on either, add `remat=blocks` when activations still do not fit (larger batches
or resolutions, full-UNet fine-tuning), then a policy to buy speed back with memory left
over; `full` is the last resort. Sampling and negatives generation use the same attention;
remat costs nothing there (there is no backward pass). See docs/memory_options.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from nsync_jax import errors
from nsync_jax.models.layers import ATTENTIONS

REMATS = ("none", "blocks", "full")


def _is_policy(fn: Any) -> bool:
    # A policy is called as policy(prim, *avals, **params); the factories in the same
    # namespace (save_only_these_names(*names), ...) take no keyword parameters.
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


REMAT_POLICIES = tuple(
    name
    for name in sorted(vars(jax.checkpoint_policies))
    if not name.startswith("_") and _is_policy(getattr(jax.checkpoint_policies, name))
)


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """The UNet's attention kernel and rematerialisation, validated (module docstring).

    Attributes:
      attention: one of `ATTENTIONS`.
      remat: one of `REMATS`.
      remat_policy: "" or a name in `REMAT_POLICIES`; needs `remat` other than "none".
    """

    attention: str = "xla"
    remat: str = "none"
    remat_policy: str = ""

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise errors.ConfigError(
                f"model.attention={self.attention!r}: expected one of {ATTENTIONS}"
            )
        if self.remat not in REMATS:
            raise errors.ConfigError(f"model.remat={self.remat!r}: expected one of {REMATS}")
        if self.remat_policy and self.remat_policy not in REMAT_POLICIES:
            known = hasattr(jax.checkpoint_policies, self.remat_policy)
            raise errors.ConfigError(
                f"model.remat_policy={self.remat_policy!r}: "
                + ("a policy factory that needs arguments; " if known else "")
                + f"expected '' or one of jax.checkpoint_policies' {REMAT_POLICIES}"
            )
        if self.remat_policy and self.remat == "none":
            raise errors.ConfigError(
                f"model.remat_policy={self.remat_policy!r} needs model.remat 'blocks' or "
                "'full' (with remat='none' nothing is rematerialised)"
            )
        if self.attention == "splash" and jax.default_backend() != "tpu":
            raise errors.ConfigError(
                f"model.attention='splash' is the Pallas TPU kernel, but the backend is "
                f"{jax.default_backend()!r}: use 'dot_product' (cuDNN flash attention on "
                "GPU), 'chunked' or 'xla'"
            )

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict) -> MemoryOptions:
        """The options of the `model` config group, checked against the backend."""
        options = cls(model_config.attention, model_config.remat, model_config.remat_policy)
        if (
            options.attention == "dot_product"
            and jax.default_backend() == "gpu"
            and model_config.compute_dtype == "float32"
        ):
            logging.warning(
                "model.attention='dot_product' with model.compute_dtype='float32' runs XLA's "
                "attention: cuDNN flash attention needs bfloat16 or float16 activations"
            )
        return options

    @property
    def policy(self) -> Callable[..., bool] | None:
        return getattr(jax.checkpoint_policies, self.remat_policy) if self.remat_policy else None

    def unet_attributes(self) -> dict[str, Any]:
        """The fields our `UNet2DConditionModel` is built with (no parameter among them).

        `full` remat wraps the whole call (`apply_unet`), so the blocks see `none`.
        """
        return {
            "attention": self.attention,
            "remat": "blocks" if self.remat == "blocks" else "none",
            "remat_policy": self.remat_policy if self.remat == "blocks" else "",
        }

    def apply_unet(
        self,
        unet: Any,
        params: Any,
        latents: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        added_cond: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """The UNet's prediction; under one `jax.checkpoint` for `remat="full"`."""

        def forward(params, latents, timesteps, context, added_cond):
            return unet.apply({"params": params}, latents, timesteps, context, added_cond)

        if self.remat == "full":
            forward = jax.checkpoint(forward, policy=self.policy)
        return forward(params, latents, timesteps, context, added_cond)
