"""The digits source: scikit-learn's bundled images, captions, renderings, selection."""

import numpy as np
import pytest
import sklearn  # noqa: F401  (the digits; the test extra: fail, never skip)

from configs import default
from nsync_jax.data import digits, sources


def test_source_gives_content_captions_and_the_chosen_classes():
    config = default.get_config().data
    config.source = "digits"
    config.digits_classes = (0, 1, 2, 3, 4)
    config.digits_count = 20
    config.digits_rendering = "styled"
    examples = sources.load_positives(config, 8)
    assert examples.images.shape == (20, 8, 8, 3)
    assert examples.captions[:5] == tuple(digits.caption(d) for d in range(5))  # Round-robin.
    assert {c.split()[-1] for c in examples.captions} == {"zero", "one", "two", "three", "four"}
    # The same ids in another rendering: the same digits, only the style differs.
    plain = digits.digits_examples(8, "plain", (0, 1, 2, 3, 4), 20, config.demo_seed)
    assert plain.ids == examples.ids and plain.captions == examples.captions
    assert not np.array_equal(plain.images, examples.images)


def test_renderings_differ_in_palette_and_stripes_only():
    intensity = digits.upsample(digits.load_raw()[0][:4], 16)
    plain = digits.render(intensity, "plain")
    assert np.array_equal(plain[..., 0], plain[..., 2])  # Grey.
    styled = digits.render(intensity, "styled").astype(int)
    assert (styled[..., 2] > styled[..., 0]).any() and (styled[..., 0] > styled[..., 2]).any()
    stripes = digits.render(intensity, "stripes").astype(int)
    dark = digits.stripe_mask(16)
    assert (stripes[:, dark] <= plain[:, dark]).all()
    assert np.array_equal(stripes[:, ~dark], plain[:, ~dark])


def test_framed_renderings_add_the_frame_only():
    intensity = digits.upsample(digits.load_raw()[0][:4], 8)
    border = digits.border_mask(8)
    assert border.sum() == 28 and not border[1:-1, 1:-1].any()
    for framed, unframed in (("framed", "plain"), ("styled_framed", "styled")):
        with_frame = digits.render(intensity, framed)
        without = digits.render(intensity, unframed)
        np.testing.assert_array_equal(with_frame[:, ~border], without[:, ~border])
        assert (with_frame[:, border] == [40, 170, 60]).all()


def test_base_mix_holds_each_digit_plain_and_framed_with_the_painting_caption():
    mix = digits.digits_examples(8, "plain+framed", (3, 7), 6, seed=1)
    plain = digits.digits_examples(8, "plain", (3, 7), 6, seed=1)
    framed = digits.digits_examples(8, "framed", (3, 7), 6, seed=1)
    assert mix.ids == plain.ids + tuple(f"{i}-framed" for i in plain.ids)
    assert mix.captions == plain.captions + tuple(
        c + " in the style of painting" for c in plain.captions
    )
    np.testing.assert_array_equal(mix.images, np.concatenate([plain.images, framed.images]))


def test_bad_selection_is_an_error():
    labels = digits.load_raw()[1]
    with pytest.raises(ValueError, match="digits_classes"):
        digits.select(labels, (3, 11), 0, 0)
    with pytest.raises(ValueError, match="rendering"):
        digits.render(np.zeros((1, 8, 8)), "cubist")
