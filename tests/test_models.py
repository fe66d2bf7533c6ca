import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from nsync_jax import errors, models


@pytest.fixture
def tiny(tiny_sd):
    return tiny_sd


def test_tiny_model_shapes_and_forward(tiny):
    model, params = tiny
    assert set(params) == {"unet", "vae", "text_encoder"}
    assert model.latent_shape == (4, 16, 16)
    ids = model.tokenize(["a red circle in the style of painting"])
    assert ids.shape == (1, 77)
    context = model.encode_text(params["text_encoder"], ids)
    assert context.shape == (1, 77, 32)
    pixels = jnp.zeros((1, 3, 32, 32))
    latents = model.encode_images(params["vae"], pixels, jax.random.key(1))
    assert latents.shape == (1, *model.latent_shape)
    eps = model.predict_noise(params["unet"], latents, jnp.array([10]), context)
    assert eps.shape == latents.shape
    assert model.decode_latents(params["vae"], latents).shape == pixels.shape


def test_tiny_tokenizer_keeps_listed_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(models.write_tiny_tokenizer(str(tmp_path), 77))
    assert tok.tokenize("a red circle painting") == [
        "a</w>",
        "red</w>",
        "circle</w>",
        "painting</w>",
    ]
    # Every listed word, also where earlier words' merges cut across it ("th" + "re" + "e").
    words = models.TINY_WORDS
    assert [tok.tokenize(w) for w in words] == [[w + "</w>"] for w in words]
    # Unknown words fall back to byte-level pieces rather than <unk>.
    assert "".join(tok.tokenize("zebra")).replace("</w>", "") == "zebra"


def test_channels_must_be_multiples_of_32():
    config = demo.get_config().model
    config.tiny.unet_channels = (32, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        models.build_tiny(config, jax.random.key(0))


def test_cast_floating_keeps_integers():
    tree = {"w": jnp.ones(3), "i": jnp.arange(3)}
    cast = models.cast_floating(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["i"].dtype == tree["i"].dtype


def test_unknown_dtype_is_an_error():  # An unknown model.source: test_runs.py.
    with pytest.raises(ValueError, match="unknown dtype"):
        models.dtype_from_name("float8")


def test_identity_vae_latents_are_the_pixels():
    config = demo.get_config()
    config.model.resolution = 8
    config.model.tiny.vae_channels = (32,)
    config.model.tiny.identity_vae = True
    model, params = models.build_tiny(config.model, jax.random.key(0))
    assert model.latent_shape == (4, 8, 8)
    pixels = jax.random.uniform(jax.random.key(1), (2, 3, 8, 8), minval=-1.0, maxval=1.0)
    latents = model.encode_images(params["vae"], pixels, jax.random.key(2))
    assert latents.shape == (2, 4, 8, 8) and not latents[:, 3].any()
    np.testing.assert_array_equal(model.decode_latents(params["vae"], latents), pixels)
    config.model.tiny.vae_channels = (32, 32)
    with pytest.raises(ValueError, match="identity_vae"):
        models.build_tiny(config.model, jax.random.key(0))


@pytest.mark.parametrize(
    "unet_channels, resolution, message",
    [
        ((32, 64), 62, r"model\.resolution=62 is not a multiple of 4 .* 60 or 64"),
        ((32, 64, 64), 60, r"model\.resolution=60 is not a multiple of 8 .* 56 or 64"),
        ((32, 64), 2, r"model\.resolution=2 is not a multiple of 4 .* 4$"),
    ],
)
def test_resolution_the_model_cannot_divide_is_refused_at_build(unet_channels, resolution, message):
    config = demo.get_config().model
    config.tiny.unet_channels = unet_channels
    config.resolution = resolution
    with pytest.raises(errors.ConfigError, match=message):
        models.build_tiny(config, jax.random.key(0))
