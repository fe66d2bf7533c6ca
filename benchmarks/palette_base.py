"""A digits base that can draw the style family: pretrained on many rendered styles.

The style encoder's first run (`style_encoder_benchmark.py` on the frame base) found that
no method, textual inversion included, reaches a style the frozen UNet never drew. Real
SD was pretrained on captions that name styles; this base is its controlled stand-in:
every scikit-learn digit in `--per_digit` random styles of `style_family`'s vocabulary
(7 dark backgrounds × 8 bright inks × 5 band patterns, colours jittered ±12), captioned
with the digit and the style's words ("a handwritten digit seven, orange on navy,
diagonal"), the five `style_family.STYLES` combinations never drawn (each of their
colours and patterns is, in other combinations). UNet and text encoder train
(`train.scope=unet_text_encoder`) through `train.train` on a `data.source='folder'` set,
the pixel-space tiny SD of the other digits benchmarks.

Then it measures what the base can draw, on the family's words (combinations it never
saw) and on combinations it trained on: the style score (`style_family.StyleScorer`) and
content (`style_metrics.ContentClassifier`). The base's workdir is what
`style_encoder_benchmark.py --base` takes.

    python benchmarks/palette_base.py --out benchmarks/results/palette_base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import style_family
import style_metrics
from style_benchmark import base_config, params_fingerprint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsync_jax import checkpoint, cli, runs, sampling, train  # noqa: E402
from nsync_jax.data import digits  # noqa: E402

RESOLUTION = 8


def palette_config(cache: str, steps: int, data_path: str):
    config = base_config(cache, steps, "frame")  # UNet and text encoder train.
    config.data.source = "folder"
    config.data.path = data_path
    config.log.every = 500
    return config


def draw(sampler, prompts: list[str]) -> np.ndarray:
    return sampler.generate(prompts, list(range(len(prompts))), progress_bar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/palette_base")
    parser.add_argument("--cache", default="/tmp/nsync-style-bench")
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--per_digit", type=int, default=4, help="styles per sklearn digit")
    parser.add_argument("--per_class", type=int, default=4, help="eval images per digit")
    parser.add_argument("--data_seed", type=int, default=0)
    args = parser.parse_args()
    cli.quiet_library_logs()
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.cache, f"palette-base-{args.steps}")
    data_path = os.path.join(cache, "data")
    timings = {}
    tick = time.perf_counter()
    if not os.path.exists(os.path.join(data_path, "metadata.jsonl")):
        style_family.write_palette_folder(data_path, RESOLUTION, args.per_digit, args.data_seed)
    config = palette_config(cache, args.steps, data_path)
    base_dir = os.path.join(cache, "base")
    if checkpoint.latest_step(base_dir) != args.steps:  # Made once, then reused.
        train.train(config, base_dir)
    timings["base_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    run = runs.load_trained(base_dir)
    sampler = sampling.make_sampler(config, config.sample, run.model, run.params)
    scorer = style_family.StyleScorer(RESOLUTION)
    classifier = style_metrics.ContentClassifier(RESOLUTION)
    labels = np.repeat(np.arange(10), args.per_class)
    rows = {}
    grids = []
    for k, style in enumerate(style_family.STYLES):  # Combinations never drawn in training.
        prompts = [style_family.palette_caption(int(d), style) for d in labels]
        images = draw(sampler, prompts)
        s = scorer.scores(images, k)
        rows[f"style {k} ({style_family.words(style)}), never trained"] = {
            "style": float(s["style"].mean()),
            "palette_distance": float(s["palette_distance"].mean()),
            "content": classifier.accuracy(images, labels),
            "plain": float((scorer.predict(images) == style_family.PLAIN).mean()),
        }
        grids.append(images)
    # Combinations the base trained on: palette distance to their named colours.
    trained = style_family.palette_styles(len(labels), args.data_seed)
    prompts = [
        style_family.palette_caption(int(d), named)
        for d, (named, _) in zip(labels, trained, strict=True)
    ]
    images = draw(sampler, prompts)
    background, ink = style_family.colours(images)
    named = [n for n, _ in trained]
    distance = 0.5 * (
        np.linalg.norm(background - np.asarray([n.background for n in named]) / 255.0, axis=-1)
        + np.linalg.norm(ink - np.asarray([n.ink for n in named]) / 255.0, axis=-1)
    )
    rows["trained combinations (one per image)"] = {
        "palette_distance": float(distance.mean()),
        "content": classifier.accuracy(images, labels),
    }
    plain = draw(sampler, [digits.caption(int(d)) for d in labels])
    rows["digit caption only"] = {
        "content": classifier.accuracy(plain, labels),
        "plain": float((scorer.predict(plain) == style_family.PLAIN).mean()),
    }
    grid = np.concatenate(grids + [images, plain])
    big = [np.kron(image, np.ones((6, 6, 1), np.uint8)) for image in grid]
    sampling.labelled_grid(big, [""] * len(big), columns=len(labels)).save(
        os.path.join(args.out, "grid.png")
    )
    timings["eval_seconds"] = time.perf_counter() - tick

    # Real references of the family, for scale.
    real = {}
    for k in range(len(style_family.STYLES)):
        images, real_labels, _ = style_family.style_images(k, RESOLUTION, 40, seed=3)
        s = scorer.scores(images, k)
        real[f"style {k}"] = {
            "style": float(s["style"].mean()),
            "palette_distance": float(s["palette_distance"].mean()),
            "content": classifier.accuracy(images, real_labels),
        }
    record = {
        "command": " ".join(sys.argv),
        "setting": {k: v for k, v in vars(args).items() if k != "out"},
        "base": base_dir,
        "base_fingerprint": params_fingerprint(run.params),
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "timings": timings,
        "base_samples": rows,
        "real_references": real,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    lines = ["| prompt | style | palette dist | content | plain |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = [row.get(c) for c in ("style", "palette_distance", "content", "plain")]
        lines.append(
            f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |"
        )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"base {record['base_fingerprint'][:12]} in {base_dir}; wrote {args.out}")


if __name__ == "__main__":
    main()
