"""The stage batches: orders, purity in (seed, step), process slices, bad images."""

import numpy as np
import pytest

from nsync_jax.data import demo
from nsync_jax.data.examples import BadImageError
from nsync_jax.style_encoder.data import StyleBatches


def _batches(order, n=10, batch=4, steps_per_batch=3, seed=0, **kwargs):
    examples = demo.demo_examples(n, 8, 0, True)
    return StyleBatches(
        examples,
        lambda prompts: np.arange(len(prompts))[:, None].repeat(5, 1),
        "{caption}, in the style of {style}.",
        "sks",
        batch,
        seed,
        order,
        steps_per_batch,
        **kwargs,
    )


def test_chunks_serve_each_batch_for_its_steps_and_cover_every_image():
    b = _batches("chunks")
    assert b.batches_per_pass == 3
    rows = [tuple(b.rows(s)) for s in range(9)]
    assert rows[0] == rows[1] == rows[2] and rows[3] == rows[5] and rows[0] != rows[3]
    assert rows[0] == tuple(b.rows(9))  # The next pass starts over.
    for r in rows:
        assert len(set(r)) == 4  # Distinct rows: stage 1 writes each back once.
    assert set(rows[0]) | set(rows[3]) | set(rows[6]) == set(range(10))
    assert b.prompts[0].endswith(", in the style of sks.")


def test_epochs_are_permutations_and_batches_are_pure():
    b = _batches("epochs", n=8)
    first_epoch = np.concatenate([b.rows(0), b.rows(1)])
    assert sorted(first_epoch) == list(range(8))
    again = _batches("epochs", n=8)
    np.testing.assert_array_equal(b.batch(5)["pixels"], again.batch(5)["pixels"])
    np.testing.assert_array_equal(b.batch(5)["index"], again.batch(5)["index"])
    other = _batches("epochs", n=8, seed=1)
    assert b.fingerprint() != other.fingerprint()
    assert b.fingerprint()["ids_sha256"] == other.fingerprint()["ids_sha256"]


def test_process_slices_and_batch_fields():
    whole = _batches("epochs", n=8).batch(3)
    halves = [_batches("epochs", n=8, process_index=p, process_count=2).batch(3) for p in (0, 1)]
    for key in ("pixels", "input_ids", "index"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    assert whole["pixels"].shape == (4, 3, 8, 8) and whole["pixels"].min() >= -1
    no_prompts = StyleBatches(
        demo.demo_examples(4, 8, 0, True), None, "{caption}", "", 4, 0, "epochs"
    )
    assert set(no_prompts.batch(0)) == {"pixels", "index"}


def test_errors():
    with pytest.raises(ValueError, match="at least a batch"):
        _batches("chunks", n=3)
    with pytest.raises(ValueError, match="order"):
        _batches("shuffled")

    class Broken:
        ids = ("a", "b")
        captions = ("x", "y")

        def __len__(self):
            return 2

        def image(self, index):
            raise BadImageError(self.ids[index], "/data/a.png", "truncated")

    b = StyleBatches(Broken(), None, "{caption}", "", 2, 0, "epochs")
    with pytest.raises(BadImageError, match="a.png"):
        b.batch(0)
