"""Tests of nsync_jax/data/examples.py: example sets, lazy reads and preprocessing."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from nsync_jax.data import examples as ex


def _rows(rows):
    return {"rows": list(rows)}


def _lazy(count=4, bad=(), cache=True, size=(40, 24)):
    calls = []

    def read(i):
        calls.append(i)
        if i in bad:
            raise OSError("image file is truncated")
        return np.full((size[1], size[0], 3), i * 10, np.uint8)

    ids = [f"img-{i}" for i in range(count)]
    names = [f"/d/{i}.jpg" for i in ids]
    lazy = ex.LazyExamples(ids, ["a cat"] * count, names, read, 16, cache, identify=_rows)
    return lazy, calls


def test_examples_validation_names_the_problem():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="'b' has an empty caption"):
        ex.Examples(("a", "b"), images, ("x", " "))
    with pytest.raises(ValueError, match="'a' is not unique"):
        ex.Examples(("a", "a"), images, ("x", "y"))
    with pytest.raises(ValueError, match="uint8"):
        ex.Examples(("a", "b"), images.astype(np.float32), ("x", "y"))


def test_select_orders_and_names_missing():
    images = np.arange(3, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    e = ex.Examples(("a", "b", "c"), images, ("1", "2", "3"))
    picked = e.select(["c", "a"])
    assert picked.ids == ("c", "a") and picked.captions == ("3", "1")
    assert picked.image(0)[0, 0, 0] == 2
    with pytest.raises(KeyError, match="'z'"):
        e.select(["a", "z"])


def test_lazy_reads_only_what_is_asked_and_caches():
    lazy, calls = _lazy()
    assert calls == []
    first = lazy.image(2)
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8 and first[0, 0, 0] == 20
    lazy.image(2)
    assert calls == [2] and lazy.reads == 1
    uncached, calls2 = _lazy(cache=False)
    uncached.image(1)
    uncached.image(1)
    assert calls2 == [1, 1]


def test_lazy_select_shares_the_cache_and_maps_rows():
    lazy, calls = _lazy()
    lazy.image(3)
    view = lazy.select(["img-3", "img-0"])
    assert view.image(0)[0, 0, 0] == 30 and view.name(1) == "/d/img-0.jpg"
    view.image(1)
    assert calls == [3, 0]


def test_bad_image_error_names_id_and_file():
    lazy, _ = _lazy(bad=(1,))
    with pytest.raises(ex.BadImageError, match=r"'img-1' \(/d/img-1.jpg\).*truncated") as info:
        lazy.image(1)
    assert info.value.example_id == "img-1"


def test_grayscale_and_rgba_arrays_become_rgb():
    ids = ["g", "r"]
    arrays = [np.full((8, 8, 1), 7, np.uint8), np.full((8, 8, 4), 9, np.uint8)]
    lazy = ex.LazyExamples(ids, ["x", "y"], ids, lambda i: arrays[i], 8, False, identify=_rows)
    assert lazy.image(0).shape == (8, 8, 3) and lazy.image(0).max() == 7
    assert lazy.image(1).shape == (8, 8, 3) and lazy.image(1).max() == 9


def test_resize_and_crop_shorter_side_centre_bicubic():
    # 60x30 (w x h): shorter side 30 -> 16, width 32; the crop keeps the middle 16 columns.
    array = np.zeros((30, 60, 3), np.uint8)
    array[:, 15:45] = 255  # Middle half white.
    out = ex.resize_and_crop(Image.fromarray(array), 16)
    assert out.shape == (16, 16, 3)
    assert out[:, 2:14].min() > 200  # Centre is the white band.
    reference = Image.fromarray(array).resize((32, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(reference)[:, 8:24])


def test_in_memory_fingerprint_hashes_pixels_ids_and_captions():
    images = np.arange(3, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    e = ex.Examples(("a", "b", "c"), images, ("1", "2", "3"))
    same = ex.Examples(("a", "b", "c"), images.copy(), ("1", "2", "3"))
    assert e.fingerprint() == same.fingerprint()
    json.dumps(e.fingerprint())  # Goes into a checkpoint's JSON metadata.
    touched = images.copy()
    touched[1, 0, 0, 0] += 1
    assert ex.Examples(("a", "b", "c"), touched, ("1", "2", "3")).fingerprint() != e.fingerprint()
    assert ex.Examples(("a", "b", "c"), images, ("1", "2", "x")).fingerprint() != e.fingerprint()
    assert e.select(["a", "b"]).fingerprint() != e.fingerprint()


def test_lazy_fingerprint_decodes_nothing_and_reflects_a_selection():
    lazy, calls = _lazy()
    fingerprint = lazy.fingerprint()
    assert calls == [] and lazy.reads == 0
    assert fingerprint["source"] == {"rows": [0, 1, 2, 3]}
    assert fingerprint == _lazy()[0].fingerprint()
    view = lazy.select(["img-3", "img-1"])
    assert view.fingerprint()["source"] == {"rows": [3, 1]}
    assert view.fingerprint()["ids_and_captions_sha256"] != fingerprint["ids_and_captions_sha256"]
    assert calls == []


def test_file_stats_follow_bytes_not_times(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        path.write_bytes(b"12345")
    names = ["a.png", "b.png"]
    stats = ex.file_stats(names, [str(p) for p in paths])
    assert stats["num_files"] == 2 and stats["bytes"] == 10
    assert ex.file_stats(names, [str(p) for p in paths]) == stats
    os.utime(paths[1], ns=(1, 10**18))  # Touched or copied: same bytes, other time.
    assert ex.file_stats(names, [str(p) for p in paths]) == stats
    paths[1].write_bytes(b"12346")  # Rewritten, same size.
    assert ex.file_stats(names, [str(p) for p in paths]) != stats
    assert ex.file_stats(["a.png", "c.png"], [str(p) for p in paths]) != stats
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ex.file_stats(["gone.png"], [str(tmp_path / "gone.png")])


def test_image_sequence_decodes_on_access():
    lazy, calls = _lazy(cache=False)
    images = ex.ImageSequence(lazy)
    assert len(images) == 4 and calls == []
    assert images[1][0, 0, 0] == 10 and calls == [1]
    assert [im[0, 0, 0] for im in images[2:4]] == [20, 30] and calls == [1, 2, 3]
    assert images[-1][0, 0, 0] == 30
    with pytest.raises(IndexError):
        images[4]
