"""Tests of nsync_jax/data/pipeline.py: determinism, per-host slices, pairing, bad images."""

import json
import logging

import numpy as np
import pytest

from nsync_jax.data import demo, pipeline
from nsync_jax.data.examples import BadImageError, LazyExamples
from nsync_jax.data.latents import LatentCache


def _tokenize(prompts):
    # Token ids that identify the prompt, so tests can check pairing through input_ids.
    return np.asarray([[int(p.split()[1])] for p in prompts], np.int32)


def _lazy(count, bad=(), prefix="p"):
    calls = []

    def read(i):
        calls.append(i)
        if i in bad:
            raise OSError("broken data stream")
        return np.full((8, 8, 3), i, np.uint8)

    ids = [f"id-{i}" for i in range(count)]
    names = [f"/data/{i}.png" for i in ids]
    captions = [f"{prefix} {i}" for i in range(count)]
    lazy = LazyExamples(ids, captions, names, read, 8, True, identify=lambda rows: {"rows": rows})
    return lazy, calls


def _batches(positives, negatives=None, batch=4, seed=0, index=0, count=1, **kw):
    return pipeline.PairedBatches(
        positives,
        negatives,
        _tokenize,
        "{caption} {style}",
        "<s>",
        batch,
        seed,
        True,
        process_index=index,
        process_count=count,
        **kw,
    )


def _ids(batch):
    return batch["positive"]["input_ids"][:, 0].tolist()


def test_batch_is_a_pure_function_of_seed_and_step():
    examples, _ = _lazy(10)
    a, b = _batches(examples), _batches(examples)
    later = [_ids(a.batch(s)) for s in (7, 2, 5)]
    assert later == [_ids(b.batch(s)) for s in (7, 2, 5)]
    np.testing.assert_array_equal(
        a.batch(3)["positive"]["pixels"], b.batch(3)["positive"]["pixels"]
    )
    other = _batches(examples, seed=1)
    assert [_ids(other.batch(s)) for s in range(5)] != [_ids(a.batch(s)) for s in range(5)]


def test_each_epoch_is_a_permutation():
    examples, _ = _lazy(8)
    batches = _batches(examples)
    for epoch in range(3):
        seen = sum((_ids(batches.batch(2 * epoch + s)) for s in range(2)), [])
        assert sorted(seen) == list(range(8))


def test_two_hosts_partition_each_global_batch_and_read_only_their_rows():
    # 10 examples, batch 4: steps 2 and 4 straddle an epoch boundary.
    single, _ = _lazy(10)
    whole = _batches(single, batch=4)
    for step in range(6):
        parts, reads = [], []
        for host in range(2):
            examples, calls = _lazy(10)
            part = _batches(examples, batch=4, index=host, count=2).batch(step)
            parts.append(part)
            reads.append(set(calls))
        full = whole.batch(step)
        np.testing.assert_array_equal(
            np.concatenate([p["positive"]["pixels"] for p in parts]), full["positive"]["pixels"]
        )
        assert _ids(parts[0]) + _ids(parts[1]) == _ids(full)
        assert reads[0] == set(_ids(parts[0])) and reads[1] == set(_ids(parts[1]))
        if step not in (2, 4):  # Within one epoch no example repeats.
            assert not reads[0] & reads[1]


def test_two_hosts_flip_the_rows_of_the_single_host_batch_alike():
    # Images that a flip changes: each row's flip must not depend on the host count.
    def read(i):
        image = np.zeros((8, 8, 3), np.uint8)
        image[:, : i % 8 + 1] = 255
        return image

    def examples():
        ids = [f"id-{i}" for i in range(12)]
        return LazyExamples(
            ids, [f"p {i}" for i in range(12)], ids, read, 8, True, identify=lambda rows: {}
        )

    whole = _batches(examples(), batch=8)
    for step in range(3):
        parts = [_batches(examples(), batch=8, index=h, count=2).batch(step) for h in range(2)]
        full = whole.batch(step)["positive"]["pixels"]
        np.testing.assert_array_equal(
            np.concatenate([p["positive"]["pixels"] for p in parts]), full
        )
    flipped = [np.any(row != row[..., ::-1]) for row in full]  # NCHW: flip W.
    assert any(flipped)


def test_flips_are_deterministic_and_per_branch():
    pos, neg = demo.demo_pair(6, 8, 0)
    batches = pipeline.PairedBatches(
        pos, neg, lambda p: np.zeros((len(p), 2)), "{caption}", "s", 64, 3, True, 0, 1
    )
    flips_pos = batches._flips(0, 0)  # Step 0, positive branch.
    assert 10 < flips_pos.sum() < 54 and (flips_pos != batches._flips(0, 1)).any()
    rows = batches._stream(0, 64)
    pixels = batches.batch(0)["positive"]["pixels"]
    expected = pos.images[rows][:, :, ::-1][flips_pos]
    got = ((pixels[flips_pos].transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert pixels.min() >= -1 and pixels.max() <= 1


def _dropout_batches(batch=64, seed=0, index=0, count=1, dropout=0.3):
    pos, _ = _lazy(10, prefix="p")
    neg, _ = _lazy(10, prefix="n")

    def tokenize(prompts):  # The empty prompt is -1; every other one its example's number.
        return np.asarray([[int(p.split()[1]) if p else -1] for p in prompts], np.int32)

    return pipeline.PairedBatches(
        pos,
        neg,
        tokenize,
        "{caption}",
        "<s>",
        batch,
        seed,
        True,
        index,
        count,
        caption_dropout=dropout,
    )


def _empty(batch):
    return {name: branch["input_ids"][:, 0] == -1 for name, branch in batch.items()}


def test_caption_dropout_rate_per_branch_and_rows_kept_intact():
    batches = _dropout_batches()
    steps = [batches.batch(s) for s in range(50)]
    for name in ("positive", "negative"):
        dropped = np.concatenate([_empty(b)[name] for b in steps])
        assert abs(dropped.mean() - 0.3) < 0.03, (name, dropped.mean())  # 3200 rows: ~4σ.
    both = np.concatenate([_empty(b)["positive"] & _empty(b)["negative"] for b in steps])
    assert abs(both.mean() - 0.09) < 0.025  # The branches draw independently.
    rows = batches._stream(0, 64)  # Kept rows carry their own caption.
    kept = ~_empty(steps[0])["positive"]
    np.testing.assert_array_equal(steps[0]["positive"]["input_ids"][kept, 0], rows[kept])
    assert not any(_empty(_dropout_batches(dropout=0.0).batch(0))["positive"])


def test_caption_dropout_is_a_pure_function_of_seed_and_step_whatever_the_processes():
    one = _dropout_batches(batch=8)
    again = _dropout_batches(batch=8)
    for step in (5, 0, 3):  # In any order, as a resumed run asks.
        expected = _empty(one.batch(step))
        got = _empty(again.batch(step))
        hosts = [_empty(_dropout_batches(batch=8, index=i, count=2).batch(step)) for i in (0, 1)]
        for name in ("positive", "negative"):
            np.testing.assert_array_equal(got[name], expected[name])
            np.testing.assert_array_equal(np.concatenate([h[name] for h in hosts]), expected[name])
    other_seed = _dropout_batches(batch=8, seed=1)
    assert any(
        (_empty(other_seed.batch(s))["positive"] != _empty(one.batch(s))["positive"]).any()
        for s in range(5)
    )


def test_negatives_pair_by_id():
    pos, _ = _lazy(6, prefix="p")
    neg_full, _ = _lazy(6, prefix="n")
    neg = neg_full.select(list(reversed(neg_full.ids)))  # Stored in another order.
    batch = _batches(pos, neg).batch(1)
    rows = batch["positive"]["input_ids"][:, 0]
    np.testing.assert_array_equal(batch["negative"]["input_ids"], batch["positive"]["input_ids"])
    np.testing.assert_array_equal(
        batch["negative"]["pixels"][:, 0, 0, 0], rows.astype(np.float32) / 127.5 - 1
    )


def test_bad_image_error_names_it():
    examples, _ = _lazy(4, bad=(2,))
    batches = _batches(examples, batch=4)
    with pytest.raises(BadImageError, match=r"'id-2' \(/data/id-2.png\)"):
        batches.batch(0)


def test_skip_substitutes_the_next_readable_example(caplog):
    examples, _ = _lazy(6, bad=(2, 3))
    with caplog.at_level(logging.WARNING):
        batches = _batches(examples, batch=6, on_bad_image="skip")
        served = _ids(batches.batch(0))
    assert sorted(served) == sorted([0, 1, 4, 4, 4, 5])  # 2 and 3 both become 4.
    assert batches.bad == {2, 3}
    assert "2 skipped so far" in caplog.text and "id-3" in caplog.text
    # Another host, or a resumed run, that meets the bad images later agrees.
    fresh, _ = _lazy(6, bad=(2, 3))
    assert _ids(_batches(fresh, batch=6, on_bad_image="skip").batch(0)) == served


def test_all_bad_and_bad_options_are_errors():
    examples, _ = _lazy(2, bad=(0, 1))
    with pytest.raises(ValueError, match="every one of the 2 examples"):
        _batches(examples, batch=2, on_bad_image="skip").batch(0)
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        _batches(examples, on_bad_image="ignore")
    with pytest.raises(ValueError, match="does not split over 3"):
        _batches(examples, batch=4, count=3)


def test_latents_replace_pixels_with_flip_selected_moments():
    examples, calls = _lazy(5)
    batches = _batches(examples, batch=4)
    mean = np.arange(5 * 2, dtype=np.float32).reshape(5, 2, 1)
    cache = LatentCache(mean, mean + 100, np.zeros(5, bool))
    batches.use_latents({"positive": cache})
    out = batches.batch(2)["positive"]
    assert set(out) == {"latent_mean", "latent_std", "input_ids"} and calls == []
    rows = out["input_ids"][:, 0]
    flips = batches._flips(2, 0)
    np.testing.assert_array_equal(out["latent_mean"][:, 0], rows * 2 + flips)
    np.testing.assert_array_equal(out["latent_std"], out["latent_mean"] + 100)


def test_fingerprint_combines_both_branches_without_reading():
    positives, calls = _lazy(6)
    negatives, negative_calls = _lazy(6, prefix="n")
    batches = _batches(positives, negatives)
    fingerprint = batches.fingerprint()
    assert calls == negative_calls == []
    assert json.loads(json.dumps(fingerprint)) == fingerprint  # As a checkpoint reads it back.
    assert fingerprint["positives"]["source"] == {"rows": [0, 1, 2, 3, 4, 5]}
    assert fingerprint["negatives"]["source"] == {"rows": [0, 1, 2, 3, 4, 5]}
    assert fingerprint == _batches(positives, negatives).fingerprint()
    assert _batches(positives).fingerprint()["negatives"] is None
    for other in (_batches(positives, negatives, seed=1), _batches(positives, negatives, batch=2)):
        assert other.fingerprint() != fingerprint
