"""Aspect-ratio buckets (nsync_jax/data/buckets.py) through the pipeline, the step and a run.

A folder of 16 images of mixed aspect ratios (6 portrait, 6 landscape, 4 square) and a
negatives store of square PNGs are written per test; the tiny demo model trains on them
with three buckets of about the demo's 32² area.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from negative_stores import write_store
from PIL import Image

from configs import demo
from nsync_jax import errors, loop, metrics, sharding, train
from nsync_jax.data import buckets, folder, pipeline
from nsync_jax.data.examples import BadImageError, Examples, resize_and_crop

# (height, width): tall, square, wide; each side a multiple of the tiny model's 4.
BUCKETS = ((40, 24), (32, 32), (24, 40))
# Image sizes (height, width) of the mixed folder: 6 portrait, 6 landscape, 4 square.
PORTRAIT = ((60, 30), (50, 28), (64, 40), (45, 30), (70, 36), (48, 26))
LANDSCAPE = tuple((w, h) for h, w in PORTRAIT)
SQUARE = ((40, 40), (33, 35), (50, 48), (30, 30))


def write_mixed_folder(root) -> list[str]:
    """The mixed folder with `metadata.jsonl`; returns the ids (file names)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i, (h, w) in enumerate(PORTRAIT + LANDSCAPE + SQUARE):
            name = f"img_{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, name)
            )
            f.write(json.dumps({"file_name": name, "text": f"painting number {i}"}) + "\n")
            names.append(name)
    return names


def expected_bucket(name: str) -> tuple[int, int]:
    i = int(name[4:6])
    return BUCKETS[0] if i < 6 else BUCKETS[2] if i < 12 else BUCKETS[1]


def _tokenize(prompts):
    return np.asarray([[len(p), sum(map(ord, p)) % 1000] for p in prompts], np.int32)


def _folder_examples(root):
    config = demo.get_config().data
    config.update(source="folder", path=str(root))
    return folder.folder_examples(config, 32)


def _batches(positives, negatives=None, batch=2, seed=0, index=0, count=1):
    return pipeline.PairedBatches(
        positives,
        negatives,
        _tokenize,
        "{caption} in the style of {style}",
        "<s>",
        global_batch_size=batch,
        seed=seed,
        random_flip=True,
        process_index=index,
        process_count=count,
        buckets=BUCKETS,
    )


def _ids(batches, step):
    bucket, rows = batches.plan.batch(step)
    return bucket, [batches.positives.ids[r] for r in rows]


# --- Buckets ---------------------------------------------------------------------------------


def test_auto_buckets_at_512_and_their_rules():
    assert buckets.auto_buckets(512) == (
        (640, 384),
        (576, 448),
        (512, 512),
        (448, 576),
        (384, 640),
    )
    for bucket in buckets.auto_buckets(1024):
        h, w = bucket
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2
        assert max(h, w) <= 2 * min(h, w) and (w, h) in buckets.auto_buckets(1024)
    assert buckets.resolve("auto", 512) == buckets.auto_buckets(512)
    with pytest.raises(errors.ConfigError, match="multiple of 64"):
        buckets.resolve("auto", 32)


@pytest.mark.parametrize(
    "value, match",
    [
        ("square", "data.buckets='square'"),
        (((32, 32), (0, 40)), r"bucket \(0, 40\)"),
        (((32, 32), (32,)), r"bucket \(32,\)"),
        (((32, 32), (32, 32)), r"\(32, 32\) is listed twice"),
    ],
)
def test_bad_buckets_are_named(value, match):
    with pytest.raises(errors.ConfigError, match=match):
        buckets.resolve(value, 32)


def test_a_bucket_the_model_cannot_take_is_named_at_setup(tmp_path, tiny_sd):
    config = demo.get_config()
    config.data.buckets = ((32, 32), (36, 30))  # 30 is not a multiple of the tiny model's 4.
    with pytest.raises(errors.ConfigError, match="bucket 36x30 .* multiple of 4"):
        train.setup(config, jax.devices()[:8], base=tiny_sd)
    config.data.buckets = BUCKETS
    config.data.cache_latents = True
    with pytest.raises(errors.ConfigError, match="cache_latents does not combine"):
        train.validate_config(config)


def test_nearest_bucket_by_log_aspect_ratio():
    sizes = {(600, 300): 0, (100, 100): 1, (300, 600): 2, (41, 39): 1, (44, 30): 0, (30, 44): 2}
    for (h, w), want in sizes.items():
        assert buckets.nearest(h, w, BUCKETS) == want, (h, w)
    # A tie goes to the bucket listed first.
    assert buckets.nearest(10, 10, ((20, 10), (10, 20))) == 0


def test_folder_sizes_come_from_headers_without_decoding(tmp_path):
    write_mixed_folder(tmp_path)
    path = tmp_path / "img_01.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # The header survives, the pixels do not.
    examples = _folder_examples(tmp_path)
    sizes = [examples.size(i) for i in range(len(examples))]
    assert sizes == list(PORTRAIT + LANDSCAPE + SQUARE)
    assert examples.reads == 0
    with pytest.raises(BadImageError, match="img_01.png"):
        examples.image(1, BUCKETS[0])


# --- Batches ---------------------------------------------------------------------------------


def test_every_batch_of_the_mixed_folder_comes_from_one_bucket(tmp_path):
    write_mixed_folder(tmp_path)
    batches = _batches(_folder_examples(tmp_path))
    assert batches.plan.steps_per_epoch == 3 + 3 + 2
    assert batches.bucket_shapes == list(BUCKETS)
    seen, order = [], []
    for step in range(2 * batches.plan.steps_per_epoch):
        bucket, ids = _ids(batches, step)
        assert {expected_bucket(i) for i in ids} == {BUCKETS[bucket]}
        pixels = batches.batch(step)["positive"]["pixels"]
        assert pixels.shape == (2, 3, *BUCKETS[bucket])
        seen.append(ids)
        order.append(bucket)
    for epoch in (seen[:8], seen[8:]):  # Each image once an epoch.
        assert sorted(i for ids in epoch for i in ids) == sorted(batches.positives.ids)
    # The buckets' batches are interleaved, not taken bucket after bucket.
    assert order[:8] != sorted(order[:8])


def test_an_image_is_resized_to_cover_its_bucket_then_centre_cropped(tmp_path):
    write_mixed_folder(tmp_path)
    examples = _folder_examples(tmp_path)
    with Image.open(tmp_path / "img_00.jpg") as image:  # 60x30 into 40x24: 48x24, crop rows.
        resized = np.asarray(image.convert("RGB").resize((24, 48), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(examples.image(0, (40, 24)), resized[4:44])
    assert resize_and_crop(Image.new("RGB", (30, 60)), 32).shape == (
        32,
        32,
        3,
    )  # Square: as before.


def test_batch_of_step_s_is_a_pure_function_of_seed_and_step(tmp_path):
    write_mixed_folder(tmp_path)

    def run(start, steps):
        batches = _batches(_folder_examples(tmp_path))  # Fresh: nothing cached or drawn.
        return [batches.batch(s) for s in range(start, start + steps)]

    def same(a, b):
        jax.tree.map(np.testing.assert_array_equal, a, b)

    whole = run(0, 12)
    same(whole, run(0, 12))
    same(whole[7:], run(7, 5))  # A restart at step 7 reads what an uninterrupted run read.
    other_seed = _batches(_folder_examples(tmp_path), seed=1)
    assert [_ids(other_seed, s) for s in range(8)] != [
        _ids(_batches(_folder_examples(tmp_path)), s) for s in range(8)
    ]
    # Two hosts each read their half of the single-host batch.
    examples = _folder_examples(tmp_path)
    halves = [_batches(examples, batch=2, index=p, count=2).batch(5) for p in range(2)]
    same(
        jax.tree.map(lambda a, b: np.concatenate([a, b]), *halves),
        _batches(_folder_examples(tmp_path)).batch(5),
    )


def test_negatives_pair_by_id_and_take_their_positives_bucket(tmp_path):
    ids = write_mixed_folder(tmp_path / "style")
    positives = _folder_examples(tmp_path / "style")
    rng = np.random.default_rng(1)
    reversed_ids = tuple(reversed(ids))  # Another order: pairing is by id, not by position.
    square = rng.integers(0, 256, (len(ids), 32, 32, 3), dtype=np.uint8)
    negatives = Examples(reversed_ids, square, ("a painting",) * len(ids))
    batches = _batches(positives, negatives)
    for step in range(8):
        bucket, rows = batches.plan.batch(step)
        out = batches.batch(step)
        assert out["negative"]["pixels"].shape == out["positive"]["pixels"].shape
        flips = batches._flips(step, 1)
        for row, flip, got in zip(rows, flips, out["negative"]["pixels"], strict=True):
            image = square[reversed_ids.index(ids[row])]
            want = resize_and_crop(Image.fromarray(image), BUCKETS[bucket])
            want = want[:, ::-1] if flip else want
            np.testing.assert_allclose(got, want.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_fingerprint_holds_the_buckets_only_when_there_are_some(tmp_path):
    write_mixed_folder(tmp_path)
    with_buckets = _batches(_folder_examples(tmp_path)).fingerprint()
    assert with_buckets["buckets"] == [list(b) for b in BUCKETS]
    plain = pipeline.PairedBatches(
        _folder_examples(tmp_path),
        None,
        _tokenize,
        "{caption} in the style of {style}",
        "<s>",
        global_batch_size=2,
        seed=0,
        random_flip=True,
    ).fingerprint()
    assert "buckets" not in plain  # As fingerprints from before buckets: they still resume.
    assert {k: v for k, v in with_buckets.items() if k != "buckets"} == plain


# --- Training --------------------------------------------------------------------------------


def _config(style, store, mode="nsync", scope="unet", num_steps=3):
    config = demo.get_config()
    config.data.update(source="folder", path=str(style), buckets=BUCKETS)
    config.negatives.update(source="store", path=str(store))
    config.train.update(mode=mode, scope=scope, batch_size=2, num_steps=num_steps)
    config.sample.every = 0
    config.log.every = 1
    return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    ids = write_mixed_folder(root / "style")
    return root / "style", write_store(root / "negatives", ids)


def test_the_step_compiles_once_per_bucket_shape_and_logs_it(data, caplog):
    # The model's step takes minutes to compile three times here (the scopes test below);
    # a cheap step shows the counting on the pipeline's real, sharded batches.
    style, store = data
    batches = _batches(_folder_examples(style), batch=2)
    mesh = sharding.make_mesh(demo.get_config().mesh, jax.devices()[:2])

    def step(state, batch):
        return state + 1, {"mean": batch["positive"]["pixels"].mean()}

    traced = []
    jitted = jax.jit(lambda state, batch: (traced.append(1), step(state, batch))[1])
    per_bucket = train.StepPerBucket(jitted, len(batches.bucket_shapes))
    state = jax.numpy.zeros((), jax.numpy.int32)
    with caplog.at_level(logging.INFO):
        for s in range(8):
            batch = sharding.global_batch(mesh, batches.batch(s))
            state, metrics = per_bucket(state, batch)
            assert metrics["mean"] == pytest.approx(batch["positive"]["pixels"].mean())
    assert int(state) == 8
    order = []  # The buckets in the order the steps first meet them.
    for s in range(8):
        bucket = BUCKETS[batches.plan.batch(s)[0]]
        order += [bucket] if bucket not in order else []
    assert len(order) == 3 and per_bucket.compiles == 3 and len(traced) == 3
    lines = [r.getMessage() for r in caplog.records if "compiled step" in r.getMessage()]
    assert lines == [
        f"compiled step for bucket {buckets.name(b)} ({n} of 3)" for n, b in enumerate(order, 1)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, scope",
    [
        ("nsync", "unet"),
        ("finetune", "textual_inversion"),
        ("nsync", "lora"),
        ("finetune", "lora_ti"),
    ],
)
def test_every_scope_and_mode_trains_one_epoch_of_buckets(data, mode, scope):
    config = _config(*data, mode=mode, scope=scope, num_steps=8)  # 8 steps: one epoch.
    trainer = train.setup(config, jax.devices()[:2])
    before = jax.device_get(trainer.state.trainable)
    timer = loop.StepTimer()  # Keeps the last step's metrics.
    state = loop.run(trainer, trainer.state, 8, [timer])
    assert int(state.nonfinite_step) == -1 and all(np.isfinite(list(timer.metrics.values())))
    assert trainer.step_fn.compiles == 3
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.trainable)
    )
    assert any(jax.tree.leaves(moved))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Timing varies between runs; every other metric must match exactly.
_TIMING = ("steps_per_s", "images_per_s")


def _launch_train(workdir, style, store, num_steps):
    flags = {
        "config": "configs/demo.py",
        "workdir": workdir,
        "config.data.source": "folder",
        "config.data.path": style,
        "config.data.buckets": repr(BUCKETS),
        "config.negatives.source": "store",
        "config.negatives.path": store,
        "config.train.batch_size": 2,
        "config.train.num_steps": num_steps,
        "config.sample.every": 0,
        "config.log.every": 1,
        "config.checkpoint.every": 3,
    }
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES="2",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        HF_HUB_OFFLINE="1",
    )
    command = [sys.executable, "launch/train.py", *(f"--{k}={v}" for k, v in flags.items())]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.mark.slow
def test_launch_train_on_buckets_resumes_exactly(data, tmp_path):
    style, store = map(str, data)
    reference = str(tmp_path / "reference")
    log = _launch_train(reference, style, store, num_steps=6)
    assert log.count("compiled step for bucket") == 3  # 6 steps of seed 0 meet all three.
    workdir = str(tmp_path / "run")
    _launch_train(workdir, style, store, num_steps=3)
    resumed = _launch_train(workdir, style, store, num_steps=6)
    assert "resuming from step 3" in resumed
    expected = metrics.read_metrics(reference)
    got = metrics.read_metrics(workdir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 7))
    for want, row in zip(expected, got, strict=True):
        assert {k: v for k, v in row.items() if k not in _TIMING} == {
            k: v for k, v in want.items() if k not in _TIMING
        }, row["step"]
