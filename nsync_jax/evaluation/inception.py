"""Inception v3 in Flax up to the 2048-d pool3 features, for FID and KID.

Two weight variants share the torchvision layer layout and parameter names and differ in
the pooling of the Inception blocks:

  * `pytorch_fid`: the standard FID network (`pt_inception-2015-12-05-*.pth`, the
    TensorFlow FID graph ported by pytorch-fid). Its A, C and E_1 blocks average-pool with
    padding excluded from the count (`count_include_pad=False`) and its last block
    (Mixed_7c, pytorch-fid's `FIDInceptionE_2`) max-pools.
  * `torchvision`: torchvision's ImageNet `inception_v3` weights (used by the NSYNC paper's
    FID/KID scripts): every pool branch averages with padding counted.

The network takes NHWC images in [-1, 1]. pytorch-fid feeds 2x − 1 of [0, 1] pixels;
torchvision's pretrained model normalises with ImageNet mean/std and then undoes it with
`transform_input=True`, which gives the same 2x − 1. The layers work at any input side of
at least 75 px; `preprocess` makes 299 px inputs as each variant's pipeline does.

BatchNorm is inference-only (running statistics, eps 1e-3) and stored under `params`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from nsync_jax.evaluation import weights

VARIANTS = ("pytorch_fid", "torchvision")
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Classes of each variant's final layer, to catch weights given for the other variant.
FC_CLASSES = {"pytorch_fid": 1008, "torchvision": 1000}


class BatchNormInference(nn.Module):
    """BatchNorm with frozen running statistics (torch's `eval()` BatchNorm2d)."""

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        mean = self.param("mean", nn.initializers.zeros, (features,))
        var = self.param("var", nn.initializers.ones, (features,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU, torchvision's `BasicConv2d`."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        return nn.relu(BatchNormInference(name="bn")(x))


def _avg_pool_3x3(x: jax.Array, include_pad: bool) -> jax.Array:
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=include_pad)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    pool_features: int
    pool_include_pad: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _avg_pool_3x3(x, self.pool_include_pad)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(bp)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    pool_include_pad: bool

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _avg_pool_3x3(x, self.pool_include_pad)
        bp = BasicConv(192, (1, 1), name="branch_pool")(bp)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """`pool`: "avg_include_pad" (torchvision), "avg_exclude_pad" (FID E_1) or "max" (E_2)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "max":
            # pytorch-fid: "the FID Inception model uses max pooling instead of average".
            bp = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            bp = _avg_pool_3x3(x, self.pool == "avg_include_pad")
        bp = BasicConv(192, (1, 1), name="branch_pool")(bp)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """Inception v3 trunk to pool3: NHWC in [-1, 1] -> (batch, 2048)."""

    variant: str = "pytorch_fid"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"inception variant {self.variant!r} is not one of {VARIANTS}")
        if min(x.shape[1:3]) < 75:
            raise ValueError(f"Inception v3 needs inputs of at least 75 px, got {x.shape}")
        fid = self.variant == "pytorch_fid"
        include_pad = not fid
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, include_pad, name="Mixed_5b")(x)
        x = InceptionA(64, include_pad, name="Mixed_5c")(x)
        x = InceptionA(64, include_pad, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, include_pad, name="Mixed_6b")(x)
        x = InceptionC(160, include_pad, name="Mixed_6c")(x)
        x = InceptionC(160, include_pad, name="Mixed_6d")(x)
        x = InceptionC(192, include_pad, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg_exclude_pad" if fid else "avg_include_pad", name="Mixed_7b")(x)
        x = InceptionE("max" if fid else "avg_include_pad", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # Adaptive average pool to 1x1: pool3.


def param_shapes(variant: str = "pytorch_fid", size: int = 75) -> Any:
    """The parameter tree's shapes (no arrays allocated)."""
    model = InceptionV3(variant)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


_TORCH_LEAF = {
    ("conv", "kernel"): "conv.weight",
    ("bn", "scale"): "bn.weight",
    ("bn", "bias"): "bn.bias",
    ("bn", "mean"): "bn.running_mean",
    ("bn", "var"): "bn.running_var",
}


def torch_source(name: str) -> weights.Source:
    """torchvision/pytorch-fid state-dict name and transform for a Flax leaf path."""
    parts = name.split("/")
    module, leaf = ".".join(parts[:-2]), _TORCH_LEAF[tuple(parts[-2:])]
    if leaf == "conv.weight":
        return f"{module}.{leaf}", lambda w: np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
    return f"{module}.{leaf}", lambda w: w


def params_from_state_dict(
    flat: weights.Flat, variant: str, path: str = "<state dict>", metric: str = "inception"
) -> Any:
    """Flax parameters from a torchvision-named Inception v3 state dict.

    `fc.*`, `AuxLogits.*` and `num_batches_tracked` are not used. When `fc.weight` is
    present its class count must match the variant (1008 for pytorch-fid's FID weights,
    1000 for torchvision's), which catches weights configured for the wrong variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"eval.inception_variant={variant!r} is not one of {VARIANTS}")
    flat = weights.strip_prefix(flat, "module.")
    if "fc.weight" in flat and flat["fc.weight"].shape[0] != FC_CLASSES[variant]:
        raise weights.WeightsError(
            f"{metric}: {path!r} has fc.weight with {flat['fc.weight'].shape[0]} classes, "
            f"but the {variant!r} variant's weights have {FC_CLASSES[variant]}; "
            "check eval.inception_variant"
        )
    return weights.assign(param_shapes(variant), flat, torch_source, metric, path)


def load_params(path: str, variant: str, metric: str = "inception") -> Any:
    """Inception parameters from a torch state dict (.pth) or its .safetensors/.npz copy."""
    return params_from_state_dict(weights.read_file(path, metric), variant, path, metric)


def resize_bilinear_torch(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`F.interpolate(mode="bilinear", align_corners=False)` (no antialias) of HWC floats.

    pytorch-fid resizes this way inside its network; NumPy keeps it per image, so images
    of any size can be batched afterwards.
    """

    def axis_weights(n_in: int, n_out: int):
        scale = n_in / n_out
        src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        return lo, hi, frac

    image = np.asarray(image, np.float32)
    lo, hi, frac = axis_weights(image.shape[0], height)
    image = image[lo] * (1 - frac)[:, None, None] + image[hi] * frac[:, None, None]
    lo, hi, frac = axis_weights(image.shape[1], width)
    return image[:, lo] * (1 - frac)[None, :, None] + image[:, hi] * frac[None, :, None]


def preprocess(image: Image.Image, variant: str, size: int = INPUT_SIZE) -> np.ndarray:
    """An RGB PIL image to the network input (size, size, 3) in [-1, 1].

    pytorch_fid: the whole image, bilinear without antialiasing to size x size (as
    pytorch-fid's `resize_input`). torchvision: shorter side to `size` (PIL bilinear, as
    `transforms.Resize`), centre crop (our reading of the paper's script).
    """
    image = image.convert("RGB")
    if variant == "pytorch_fid":
        pixels = np.asarray(image, np.float32) / 255.0
        pixels = resize_bilinear_torch(pixels, size, size)
    elif variant == "torchvision":
        from nsync_jax.evaluation import images

        image = images.resize_shorter_side(image, size, Image.BILINEAR)
        pixels = np.asarray(images.center_crop(image, size), np.float32) / 255.0
    else:
        raise ValueError(f"eval.inception_variant={variant!r} is not one of {VARIANTS}")
    return 2.0 * pixels - 1.0
