"""How the diffusers Flax UNet attends and what its backward pass keeps: `model.attention`,
`model.remat` and `model.remat_policy`, applied without owning diffusers' modules.

Attention (`model.attention`) is softmax(Q Kᵀ · dim_head^-0.5) V in every
`FlaxAttention` of the UNet (self- and cross-attention), computed by:

- `xla` (default): diffusers' own einsums. Holds the [batch·heads, T, S] score matrix, in
  the forward pass and for the backward pass: at 512 px that is the largest activation.
- `dot_product`: `jax.nn.dot_product_attention`. On NVIDIA GPUs with bfloat16/float16
  activations and a head width that is a multiple of 8 and at most 128, it runs cuDNN's
  flash attention (`implementation="cudnn"`): no score matrix in memory, the fastest
  choice on GPU. Otherwise (float32, CPU, TPU, SD 1.5's 160-wide heads at the two deepest
  levels) it is XLA's attention, the same math as `xla`: jax 0.10's
  `implementation=None` always picks XLA, so the cuDNN choice is made here. Nothing is
  cast: float32 stays exact and gets no flash attention (set `model.compute_dtype` to
  bfloat16 for it).
- `chunked`: diffusers' memory-efficient path (`use_memory_efficient_attention=True` on the
  UNet; Rabe & Staats 2021, https://arxiv.org/abs/2112.05682): queries and keys in chunks
  under `jax.checkpoint`, so the full score matrix never exists. Any backend; slower than
  `xla`, a way to fit large images where no flash kernel exists.
- `splash`: the Pallas TPU splash-attention kernel, TPU only (an error elsewhere, raised when
  the model is built). Sequences are padded to the kernel's blocks (padded keys masked by
  segment ids) and head widths to 128 lanes, as MaxDiffusion does.

`dot_product` and `splash` replace `FlaxAttention.__call__` through
`flax.linen.intercept_methods`: the interceptor calls the module's own `to_q`/`to_k`/`to_v`/
`to_out_0` layers and dropout around the kernel, so parameter names and shapes are those of
`xla`, and LoRA's interceptor (which wraps those Dense layers) composes with it.

Rematerialisation (`model.remat`) trades compute for memory in the backward pass:

- `none` (default): every activation the backward pass needs is kept.
- `blocks`: each UNet down, mid and up block is a `flax.linen.remat` unit (MaxDiffusion's
  choice): only block inputs are kept and each block's forward runs again in the backward
  pass, about one third more compute for a large cut in activation memory. The wrapping is
  an interceptor on the blocks' `__call__`, so the UNet and its parameters are unchanged.
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

import contextlib
import contextvars
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nsync_jax import errors, library_logs

with library_logs.quiet_import():  # Some of diffusers' Flax modules log on import.
    from diffusers.models.attention_flax import FlaxAttention
    from diffusers.models.unets import unet_2d_blocks_flax

ATTENTIONS = ("xla", "dot_product", "chunked", "splash")
REMATS = ("none", "blocks", "full")

# The blocks `FlaxUNet2DConditionModel.setup` builds: the units of `remat="blocks"`.
UNET_BLOCKS = (
    unet_2d_blocks_flax.FlaxCrossAttnDownBlock2D,
    unet_2d_blocks_flax.FlaxDownBlock2D,
    unet_2d_blocks_flax.FlaxUNetMidBlock2DCrossAttn,
    unet_2d_blocks_flax.FlaxCrossAttnUpBlock2D,
    unet_2d_blocks_flax.FlaxUpBlock2D,
)

Kernel = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


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
        """Attributes the `FlaxUNet2DConditionModel` is built with (no parameter among them)."""
        return {"use_memory_efficient_attention": self.attention == "chunked"}

    def apply_unet(
        self,
        unet: nn.Module,
        params: Any,
        latents: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
    ) -> jax.Array:
        """`unet.apply(...).sample` with this attention kernel and remat."""

        def forward(params, latents, timesteps, context):
            with self.intercept():
                return unet.apply(
                    {"params": params}, latents, timesteps, context, train=False
                ).sample

        if self.remat == "full":
            forward = jax.checkpoint(forward, policy=self.policy)
        return forward(params, latents, timesteps, context)

    @contextlib.contextmanager
    def intercept(self) -> Iterator[None]:
        """Within it, UNet modules attend with `attention` and blocks remat per `remat`."""
        with contextlib.ExitStack() as stack:
            if self.attention in KERNELS:
                stack.enter_context(
                    nn.intercept_methods(attention_interceptor(KERNELS[self.attention]))
                )
            if self.remat == "blocks":
                stack.enter_context(nn.intercept_methods(remat_blocks_interceptor(self.policy)))
            yield


def attend(
    module: FlaxAttention,
    kernel: Kernel,
    hidden_states: jax.Array,
    context: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """`FlaxAttention.__call__` (diffusers 0.39) with `kernel` computing the attention.

    Heads split as diffusers' `reshape_heads_to_batch_dim` splits them (head-major
    channels), softmax scale dim_head^-0.5, then `to_out_0` and dropout: the module's own
    layers, so its parameters are read where diffusers reads them.
    """
    context = hidden_states if context is None else context
    batch = hidden_states.shape[0]

    def split_heads(x):  # [B, T, heads · dim_head] -> [B, T, heads, dim_head]
        return x.reshape(batch, x.shape[1], module.heads, module.dim_head)

    out = kernel(
        split_heads(module.query(hidden_states)),
        split_heads(module.key(context)),
        split_heads(module.value(context)),
        module.dim_head**-0.5,
    )
    out = module.proj_attn(out.reshape(batch, -1, module.heads * module.dim_head))
    return module.dropout_layer(out, deterministic=deterministic)


def attention_interceptor(kernel: Kernel):
    """An interceptor that runs every `FlaxAttention.__call__` as `attend(..., kernel)`."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, FlaxAttention):
            return next_fun(*args, **kwargs)
        return attend(context.module, kernel, *args, **kwargs)

    return interceptor


# Set while a rematted block's body runs, so the block's own (cloned) call inside passes
# through instead of being rematted again. Tracing is synchronous, so a context variable
# scoped to the body is exact; blocks hold no blocks, so nothing else is skipped.
_IN_REMAT_BLOCK = contextvars.ContextVar("nsync_in_remat_block", default=False)


def remat_blocks_interceptor(policy: Callable[..., bool] | None):
    """An interceptor that runs each UNet block's `__call__` under `flax.linen.remat`.

    Python scalars among the keyword arguments (`deterministic`) stay static: `jax.remat`
    would trace them, and dropout branches on them.
    """

    def interceptor(next_fun, args, kwargs, context):
        if (
            context.method_name != "__call__"
            or not isinstance(context.module, UNET_BLOCKS)
            or _IN_REMAT_BLOCK.get()
        ):
            return next_fun(*args, **kwargs)
        static = {k: v for k, v in kwargs.items() if isinstance(v, bool | int | float | None)}
        dynamic = {k: v for k, v in kwargs.items() if k not in static}

        def body(block, args, dynamic):
            token = _IN_REMAT_BLOCK.set(True)
            try:
                return block(*args, **dynamic, **static)
            finally:
                _IN_REMAT_BLOCK.reset(token)

        return nn.remat(body, policy=policy)(context.module, args, dynamic)

    return interceptor


def dot_product_kernel(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """`jax.nn.dot_product_attention` on [B, T, N, H]; cuDNN where it applies (docstring)."""
    flash = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, implementation="cudnn" if flash else None
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_kernel(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *, interpret: bool = False
) -> jax.Array:
    """The Pallas splash-attention kernel on [B, T, N, H] (vmapped over the batch).

    The kernel takes [N, T, H] per example with T and S multiples of its block sizes and
    H a multiple of the 128 lanes, and applies no scale. So q is scaled first, sequences
    and heads are zero-padded; padded keys get segment id 0 and every query id 1, so no
    query attends to padding and no row is fully masked (padded query rows are dropped).
    Zero-padded head channels add nothing to Q Kᵀ and are sliced off V's output.
    `interpret=True` runs the kernel's reference interpreter (any backend; for tests).

    On a multi-device mesh XLA cannot partition the Pallas call: it runs on gathered
    inputs unless wrapped in `shard_map` (MaxDiffusion does; not done here).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    _, t, heads, width = q.shape
    s = k.shape[1]
    block_q = min(512, _round_up(t, 128))
    block_kv = min(512, _round_up(s, 128))
    t_pad, s_pad, width_pad = _round_up(t, block_q), _round_up(s, block_kv), _round_up(width, 128)

    def to_kernel_layout(x, length):  # [B, L, N, H] -> [B, N, L_pad, H_pad]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width_pad - width)))
        return x.transpose(0, 2, 1, 3)

    block_sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([masks.FullMask((t_pad, s_pad))] * heads),
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    segment_ids = splash.SegmentIds(
        q=jnp.ones((t_pad,), jnp.int32), kv=(jnp.arange(s_pad) < s).astype(jnp.int32)
    )
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids))(
        to_kernel_layout(q * jnp.asarray(scale, q.dtype), t_pad),
        to_kernel_layout(k, s_pad),
        to_kernel_layout(v, s_pad),
    )
    return out[:, :, :t, :width].transpose(0, 2, 1, 3).astype(q.dtype)


# The attentions that replace diffusers' own call; `xla` and `chunked` are diffusers' paths.
KERNELS: dict[str, Kernel] = {"dot_product": dot_product_kernel, "splash": splash_kernel}
