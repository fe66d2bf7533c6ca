"""The layers every model of `nsync_jax.models` is built from: LoRA-aware Dense and Conv,
and the attention kernels chosen by name.

Parameter names and layouts are Flax's (`kernel` in `[in, out]` or HWIO, `bias`, `scale`),
so one rule (`weights.torch_key`) maps every parameter to its PyTorch key.

LoRA is a property of these layers, not an interceptor: a `Dense` or `Conv` whose
parameters hold `lora_a` (`[in, r]`, conv `[kh, kw, in, r]`) and `lora_b` (`[r, out]`) next
to its kernel adds `lora_scale · (x A) B` to its output. `lora_scale` (alpha / r) is a field
the model passes down; without adapters in the tree a layer is a plain Dense or Conv.

Attention (`attention(q, k, v, kind)`) is softmax(Q Kᵀ · dim_head^-0.5) V on `[B, T, N, H]`
heads, computed by one of `ATTENTIONS`:

- `xla`: plain einsums; holds the [B, N, T, S] score matrix.
- `dot_product`: `jax.nn.dot_product_attention`; cuDNN flash attention on NVIDIA GPUs with
  bf16/f16 activations and a head width that is a multiple of 8 and at most 128,
  otherwise XLA's attention (the same math as `xla`).
- `chunked`: queries and keys in chunks with a running softmax under `jax.checkpoint`
  (Rabe & Staats 2021, https://arxiv.org/abs/2112.05682): the score matrix never exists.
- `splash`: the Pallas TPU splash-attention kernel (TPU only; `interpret` elsewhere, tests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

A_NAME, B_NAME = "lora_a", "lora_b"
ATTENTIONS = ("xla", "dot_product", "chunked", "splash")


def _lora_delta(module: nn.Module, x: jax.Array, down: Callable[[jax.Array], jax.Array]):
    """`(x A) B` of a layer with adapters, or None; `down` applies A as the layer would."""
    if not module.has_variable("params", A_NAME):
        return None
    a = module.get_variable("params", A_NAME)
    b = module.get_variable("params", B_NAME)
    h = down(a)
    return jnp.einsum("...r,ro->...o", h, b.astype(h.dtype))


class Dense(nn.Module):
    """`y = x W + b` on the last axis, plus `lora_scale · (x A) B` when adapters are present.

    Attributes:
      features: output width.
      use_bias: whether to add a bias.
      dtype: the computation dtype (parameters are cast to it; they keep their own).
      lora_scale: alpha / r of attached adapters.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        delta = _lora_delta(self, x, lambda a: jnp.dot(x, a.astype(self.dtype)))
        if delta is not None:
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return y


class Conv(nn.Module):
    """A 2-D convolution on NHWC inputs (HWIO kernel), plus LoRA as `Dense` has it: A is a
    convolution of the layer's own shape, strides and padding with r outputs, B a 1x1.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: as `jax.lax.conv_general_dilated` takes it ("SAME", "VALID" or pairs).
      use_bias: whether to add a bias.
      dtype: the computation dtype.
      lora_scale: alpha / r of attached adapters.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Any = ((1, 1), (1, 1))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            window_strides=tuple(self.strides),
            padding=self.padding if isinstance(self.padding, str) else tuple(self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape)
        x = x.astype(self.dtype)
        y = self._conv(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        delta = _lora_delta(self, x, functools.partial(self._conv, x))
        if delta is not None:
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return y


# ---------------------------------------------------------------------------------------
# Attention kernels on [B, T, N, H] queries and [B, S, N, H] keys and values.


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q kᵀ · scale) v with plain einsums; the softmax in fp32."""
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * jnp.asarray(scale, q.dtype)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """`jax.nn.dot_product_attention`; cuDNN where it applies (module docstring)."""
    flash = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, implementation="cudnn" if flash else None
    )


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    query_chunk: int = 1024,
    key_chunk: int = 4096,
) -> jax.Array:
    """Exact attention over query and key chunks with a running (log-sum-exp) softmax.

    Each query chunk scans the key chunks keeping the running max, the sum of
    exponentials and the weighted values, all in fp32; every chunk's body is under
    `jax.checkpoint`, so the backward pass recomputes scores instead of storing them.
    """
    batch, t, heads, width = q.shape
    s = k.shape[1]
    query_chunk, key_chunk = min(query_chunk, t), min(key_chunk, s)
    if t % query_chunk or s % key_chunk:  # Fall back to one chunk per axis.
        query_chunk = query_chunk if t % query_chunk == 0 else t
        key_chunk = key_chunk if s % key_chunk == 0 else s
    q = q * jnp.asarray(scale, q.dtype)
    k_chunks = k.reshape(batch, s // key_chunk, key_chunk, heads, width).swapaxes(0, 1)
    v_chunks = v.reshape(batch, s // key_chunk, key_chunk, heads, width).swapaxes(0, 1)

    @jax.checkpoint
    def key_step(carry, kv):
        q_chunk, (m, total, acc) = carry
        k_chunk, v_chunk = kv
        scores = jnp.einsum("btnh,bsnh->bnts", q_chunk, k_chunk).astype(jnp.float32)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        total = total * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bnts,bsnh->bnth", p, v_chunk.astype(jnp.float32)
        )
        return (q_chunk, (m_new, total, acc)), None

    def query_chunk_out(q_chunk):
        shape = (batch, heads, q_chunk.shape[1])
        init = (
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, width), jnp.float32),
        )
        (_, (_, total, acc)), _ = jax.lax.scan(key_step, (q_chunk, init), (k_chunks, v_chunks))
        return (acc / total[..., None]).transpose(0, 2, 1, 3).astype(v.dtype)  # [B, t, N, H]

    q_chunks = q.reshape(batch, t // query_chunk, query_chunk, heads, width).swapaxes(0, 1)
    out = jax.lax.map(query_chunk_out, q_chunks)  # [chunks, B, t, N, H]
    return out.swapaxes(0, 1).reshape(batch, t, heads, width)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_attention(
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


KERNELS: dict[str, Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]] = {
    "xla": xla_attention,
    "dot_product": dot_product_attention,
    "chunked": chunked_attention,
    "splash": splash_attention,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kind: str = "xla") -> jax.Array:
    """softmax(q kᵀ / sqrt(H)) v on [B, T, N, H] / [B, S, N, H] with kernel `kind`.

    Raises:
      ValueError: an unknown `kind`.
    """
    if kind not in KERNELS:
        raise ValueError(f"attention kind {kind!r} is not one of {ATTENTIONS}")
    return KERNELS[kind](q, k, v, q.shape[-1] ** -0.5)
