"""Tests of the negatives store: counts, determinism, resumption, settings and pairing."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from nsync_jax import negatives, runs
from nsync_jax.data import negatives_store, pipeline, sources
from nsync_jax.data.examples import BadImageError

COUNT = 5  # Demo examples; with K=2, ten images: two batches of eight on eight devices.
K = 2


def _config(path, **negatives_fields):
    config = demo.get_config()
    config.data.demo_count = COUNT
    fields = dict(path=str(path), per_example=K, scheduler="ddim", num_steps=2, size=0)
    config.negatives.update(**{**fields, "batch_per_device": 1, **negatives_fields})
    return config


def _pixels(path):
    """{file name: uint8 pixels} of a store's images."""
    folder = os.path.join(path, negatives.IMAGES)
    return {n: np.asarray(Image.open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))}


def _no_tokens(texts):
    return np.zeros((len(texts), 4), np.int32)


def _manifest_lines(path):
    with open(os.path.join(path, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base():
    return runs.build_base(demo.get_config())


@pytest.fixture(scope="module")
def full_store(base, tmp_path_factory):
    """A store generated in one uninterrupted run."""
    path = tmp_path_factory.mktemp("full")
    result = negatives.generate_store(_config(path), model_and_params=base)
    assert result.generated == COUNT * K and result.complete
    return str(path)


def test_image_seed_is_stable_and_distinct():
    assert negatives.image_seed("demo-00000", 0) == 2188111525  # Never change: stores rely on it.
    seeds = {negatives.image_seed(f"demo-{i:05d}", k) for i in range(100) for k in range(3)}
    assert len(seeds) == 300


def test_image_names_are_safe_and_unique():
    assert negatives.image_name("demo-00001", 2) == "demo-00001_2.png"
    a, b = negatives.image_name("a/b", 0), negatives.image_name("a_b", 0)
    assert "/" not in a and a != b


def test_store_holds_k_images_per_example_with_metadata(full_store):
    lines = _manifest_lines(full_store)
    assert len(lines) == COUNT * K
    assert len({(e["id"], e["k"]) for e in lines}) == COUNT * K
    positives = sources.load_positives(_config(full_store).data, 32)
    captions = dict(zip(positives.ids, positives.captions, strict=True))
    for entry in lines:
        assert entry["caption"] == captions[entry["id"]]
        assert entry["prompt"] == f"{entry['caption']} in the style of painting"
        assert entry["image_seed"] == negatives.image_seed(entry["id"], entry["k"])
    with open(os.path.join(full_store, negatives.SETTINGS)) as f:
        settings = json.load(f)
    assert settings["scheduler"] == "ddim" and settings["num_steps"] == 2
    assert settings["model"]["source"] == "tiny" and settings["per_example"] == K
    pixels = _pixels(full_store)
    assert len(pixels) == COUNT * K
    assert all(p.shape == (32, 32, 3) for p in pixels.values())
    # Different (id, k): different noise, different pixels.
    values = list(pixels.values())
    assert all(np.abs(values[0].astype(int) - v).mean() > 1 for v in values[1:])


def test_interrupted_run_resumes_to_the_same_store(base, full_store, tmp_path):
    config = _config(tmp_path)
    first = negatives.generate_store(config, max_images=3, model_and_params=base)
    assert (first.generated, first.complete) == (3, False)
    # A crash mid-append: the last line is cut in half and its image is gone too.
    manifest = os.path.join(tmp_path, "manifest.jsonl")
    with open(manifest) as f:
        text = f.read()
    last = json.loads(text.splitlines()[-1])
    with open(manifest, "w") as f:
        f.write(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    os.remove(os.path.join(tmp_path, last["file"]))
    stale = tmp_path / negatives.IMAGES / "demo-00001_0.png.tmp-123"
    stale.write_bytes(b"half a png")
    second = negatives.generate_store(config, model_and_params=base)
    assert second.complete and second.generated == COUNT * K - 2
    lines = _manifest_lines(tmp_path)
    assert len(lines) == len({(e["id"], e["k"]) for e in lines}) == COUNT * K
    assert not stale.exists()
    resumed, full = _pixels(str(tmp_path)), _pixels(full_store)
    assert sorted(resumed) == sorted(full)
    for name in full:  # Other batch rows and devices: equal up to rounding.
        assert np.abs(resumed[name].astype(int) - full[name]).max() <= 1, name
    # Idempotent: a complete store is left alone (no model needed).
    third = negatives.generate_store(config)
    assert (third.generated, third.complete) == (0, True)
    assert len(_manifest_lines(tmp_path)) == COUNT * K


def test_other_settings_are_refused_by_name(full_store):
    config = _config(full_store, num_steps=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale: store has 7.5") as error:
        negatives.generate_store(config)
    assert "num_steps: store has 2, config has 3" in str(error.value)


def test_changed_captions_are_refused(full_store, tmp_path):
    store = tmp_path / "store"
    os.makedirs(store / negatives.IMAGES)
    with open(os.path.join(full_store, negatives.SETTINGS)) as f:
        (store / negatives.SETTINGS).write_text(f.read())
    entry = {**_manifest_lines(full_store)[0], "prompt": "a cat in the style of painting"}
    (store / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match="captions changed"):
        negatives.generate_store(_config(store))


def test_store_pairs_with_positives_by_id(full_store):
    config = _config(full_store, source="store", pair_k=1)
    positives = sources.load_positives(config.data, 32)
    negs = sources.load_negatives(config.negatives, config.data, 32)
    assert negs.ids == positives.ids and negs.captions == positives.captions
    expected = _pixels(full_store)[negatives.image_name(positives.ids[2], 1)]
    np.testing.assert_array_equal(negs.image(2), expected)
    batches = pipeline.PairedBatches(
        positives,
        negs,
        tokenize=_no_tokens,
        prompt_template=config.train.prompt_template,
        style_token=config.train.style_token,
        global_batch_size=4,
        seed=0,
        random_flip=False,
    )
    batch = batches.batch(0)
    assert batch["negative"]["pixels"].shape == batch["positive"]["pixels"].shape == (4, 3, 32, 32)
    # Resized like positives when the training resolution differs.
    small = negatives_store.load_store(full_store, 16)
    assert len(small) == COUNT and small.image(COUNT - 1).shape == (16, 16, 3)


def test_store_errors_name_what_is_wrong(full_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no negatives store"):
        negatives_store.load_store(str(tmp_path / "nowhere"), 32)
    with pytest.raises(ValueError, match="pair_k=2"):
        negatives_store.load_store(full_store, 32, k=2)
    with pytest.raises(KeyError, match="demo-99999"):
        negatives_store.load_store(full_store, 32, ids=["demo-00000", "demo-99999"])
    # A store missing one positive's image fails at pairing, naming the id.
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for name in (negatives.SETTINGS, negatives.IMAGES):
        os.symlink(os.path.join(full_store, name), broken / name)
    lines = [e for e in _manifest_lines(full_store) if e["id"] != "demo-00003"]
    (broken / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    config = _config(broken, source="store")
    positives = sources.load_positives(config.data, 32)
    negs = sources.load_negatives(config.negatives, config.data, 32)
    with pytest.raises(KeyError, match="demo-00003"):
        pipeline.PairedBatches(positives, negs, _no_tokens, "{caption}", "<s>", 2, 0, False)
    # A corrupt PNG is named when read (a BadImageError: on_bad_image applies), a missing
    # one when the store is opened.
    corrupt = tmp_path / "corrupt"
    os.makedirs(corrupt / negatives.IMAGES)
    os.symlink(os.path.join(full_store, negatives.SETTINGS), corrupt / negatives.SETTINGS)
    entry = _manifest_lines(full_store)[0]
    (corrupt / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    (corrupt / entry["file"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lazy = negatives_store.load_store(str(corrupt), 32)
    with pytest.raises(ValueError, match=entry["file"]):
        lazy.image(0)
    os.remove(corrupt / entry["file"])
    with pytest.raises(FileNotFoundError, match=entry["file"]):
        negatives_store.load_store(str(corrupt), 32)
    skipped = negatives_store.load_store(str(corrupt), 32, on_bad_image="skip")
    with pytest.raises(BadImageError, match=entry["file"]):
        skipped.image(0)


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="negatives.path is empty"):
        negatives.generate_store(_config(""))
    with pytest.raises(ValueError, match="has no {caption}"):
        negatives.generate_store(_config(tmp_path, prompt_template="a painting"))
    with pytest.raises(ValueError, match="scheduler 'nope'"):
        negatives.generate_store(_config(tmp_path, scheduler="nope"))


def test_settings_record_pretrained_source():
    config = ml_collections.ConfigDict(_config("/x").to_dict())
    config.model.source = "pretrained"
    settings = negatives.store_settings(config)
    assert settings["model"]["pretrained"] == config.model.pretrained
    assert "tiny" not in settings["model"]


def test_failed_model_build_leaves_no_settings_and_the_fix_runs(base, tmp_path):
    wrong = _config(tmp_path)
    wrong.model.source = "pretrained"
    wrong.model.pretrained = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        negatives.generate_store(wrong)
    assert not (tmp_path / negatives.SETTINGS).exists()
    fixed = negatives.generate_store(_config(tmp_path), max_images=1, model_and_params=base)
    assert fixed.generated == 1 and (tmp_path / negatives.SETTINGS).exists()
    # A store with settings is still checked before any work.
    with pytest.raises(ValueError, match="num_steps: store has 2, config has 3"):
        negatives.generate_store(_config(tmp_path, num_steps=3))


def _folder_with_a_bad_image(root):
    """Three readable paintings and `bad.png`, all captioned in metadata.jsonl."""
    root.mkdir()
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", "bad.png", "c.png"]
    for name in names:
        if name == "bad.png":
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / name)
    lines = [json.dumps({"file_name": n, "text": f"a painting of {n[0]}"}) for n in names]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _folder_config(data_dir, store, on_bad_image):
    config = _config(store, per_example=1)
    config.data.source, config.data.path = "folder", str(data_dir)
    config.data.on_bad_image = on_bad_image
    return config


def test_bad_positive_stops_generation_or_is_skipped_and_training_skips_it(base, tmp_path):
    data_dir, store = tmp_path / "data", tmp_path / "store"
    _folder_with_a_bad_image(data_dir)
    with pytest.raises(BadImageError, match="bad.png"):
        negatives.generate_store(_folder_config(data_dir, store, "error"), model_and_params=base)
    assert not (store / negatives.SETTINGS).exists()

    config = _folder_config(data_dir, store, "skip")
    result = negatives.generate_store(config, model_and_params=base)
    assert (result.generated, result.bad_positives, result.complete) == (3, 1, True)
    bad_line = next(e for e in _manifest_lines(store) if e["id"] == "bad.png")
    assert "file" not in bad_line and "bad.png" in bad_line["bad"]
    again = negatives.generate_store(config)  # Still bad: nothing new, no model needed.
    assert (again.generated, again.complete) == (0, True)
    assert len(_manifest_lines(store)) == 4

    # Training: the bad positive and its absent negative are skipped as one bad example.
    config.negatives.source = "store"
    positives = sources.load_positives(config.data, 32)
    negs = sources.load_negatives(config.negatives, config.data, 32)
    with pytest.raises(BadImageError, match="could not be decoded when the store was made"):
        negs.select(["bad.png"]).image(0)
    batches = pipeline.PairedBatches(
        positives, negs, _no_tokens, "{caption}", "<s>", 8, 0, False, on_bad_image="skip"
    )
    batch = batches.batch(0)
    assert batch["negative"]["pixels"].shape == (8, 3, 32, 32)
    assert batches.bad == {positives.ids.index("bad.png")}
    strict = pipeline.PairedBatches(positives, negs, _no_tokens, "{caption}", "<s>", 8, 0, False)
    with pytest.raises(BadImageError, match="bad.png"):
        strict.batch(0)

    # Fixed later: a rerun makes its negative, and the image beats the bad line.
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data_dir / "bad.png")
    fixed = negatives.generate_store(config, model_and_params=base)
    assert (fixed.generated, fixed.bad_positives) == (1, 0)
    repaired = negatives_store.load_store(str(store), 32)
    assert repaired.select(["bad.png"]).image(0).shape == (32, 32, 3)


def test_store_fingerprint_reads_no_png_and_sees_changes(full_store, tmp_path):
    store = tmp_path / "copy"
    shutil.copytree(full_store, store)
    negs = negatives_store.load_store(str(store), 32, k=1)
    fingerprint = negs.fingerprint()
    assert negs.reads == 0 and fingerprint["source"]["num_files"] == COUNT
    assert negatives_store.load_store(str(store), 32, k=1).fingerprint() == fingerprint
    assert negatives_store.load_store(str(store), 32, k=0).fingerprint() != fingerprint
    view = negs.select(negs.ids[:2]).fingerprint()
    assert view["source"]["num_files"] == 2
    first = store / negatives.IMAGES / negatives.image_name(negs.ids[0], 1)
    os.utime(first, ns=(1, 10**18))  # Same bytes: the same store.
    assert negatives_store.load_store(str(store), 32, k=1).fingerprint() == fingerprint
    first.write_bytes(first.read_bytes() + b"\0")
    assert negatives_store.load_store(str(store), 32, k=1).fingerprint() != fingerprint
