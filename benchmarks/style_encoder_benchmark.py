"""The style encoder's evidence on data we can make (issue 16 §2): the digits in a family
of rendered styles (`benchmarks/style_family.py`), captions of the digit only.

- Base: the pretrained tiny pixel-space digits SD of `style_benchmark.py --testbed frame`
  (its text encoder trained), `--base` (a workdir; read only, loaded as `model.init_from`).
- Data: `--train_per_style` images of each seen style (`style_family.SEEN`) train stages
  1-3; `--refs` other images of every style are the held-out references; the unseen style
  (`style_family.UNSEEN`) is never in stages 1-3.
- Methods, per seed, through the library code `launch/train_style_encoder.py` uses
  (`style_encoder.run.train_stage`): stage 1 → 2 → 3, and the paper's ablation, stages 2
  and 3 with `style.head="slice"` (no projection) from the same stage 1; plus a textual
  inversion token per style from our trainer (`train.setup`, `loop.run`) on that style's
  training images (for the unseen style: its own images, which the encoder never sees).
- Generation: for every evaluated style, reference and content prompt (digits 0-9), one
  image with ", in the style of sks." and the method's tokens spliced in (CFG on the
  styled prompt, the paper's main setting). Stage 1 has no encoder: it uses the bank
  vectors of a training image of the style (seen styles only).
- Scores: `StyleScorer` (is the image classified as the reference's style; palette
  distance), `style_metrics.ContentClassifier` (is it the prompted digit); and stage 1's
  fit: the denoising loss of every training image with its trained vectors and with its
  initial ones (what the public code saves), on fixed draws.

Each (method, seed) is written to <out>/parts/ when done and skipped when found (resume with
the same command); results.json merges the parts present.

    python benchmarks/style_encoder_benchmark.py --quick --seeds 1 \
        --out benchmarks/results/style_encoder_digits_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import style_encoder_stage1
import style_family
import style_metrics
from style_benchmark import (
    base_config,
    check_setting,
    mean_std_interval,
    params_fingerprint,
    part_path,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import style_encoder  # noqa: E402
from nsync_jax import checkpoint, cli, loop, runs, sampling, train  # noqa: E402
from nsync_jax.data import digits  # noqa: E402
from nsync_jax.data.examples import to_pixels  # noqa: E402
from nsync_jax.style_encoder import encoder as encoder_lib  # noqa: E402
from nsync_jax.style_encoder import generate as generate_lib  # noqa: E402
from nsync_jax.style_encoder import run as run_lib  # noqa: E402
from nsync_jax.style_encoder import splice, stages  # noqa: E402

DEFAULT_BASE = "/tmp/nsync-style-bench/frame-base-12000/base"
RESOLUTION = 8
METHODS = (
    "stage1",
    "stage2",
    "stage3",
    "stage3-dual",
    "stage3-slice",
    "textual_inversion",
    "words",
)
DUAL_STYLE_SCALE = 1.0  # s_s of "stage3-dual" (the paper's; its s_t is our CFG scale).
SCOPE = "digits"  # part_path's "(scope)": one setting here.


def key_of(method: str) -> str:
    return f"{method} ({SCOPE})"


def make_data(root: str, args) -> dict:
    """<root>/train (seen styles), <root>/style<k> (each style's training images, for
    textual inversion) and the references in memory; returns their description."""
    refs, train_ids = {}, {}
    train_images, train_labels, train_names = [], [], []
    for k, style in enumerate(style_family.STYLES):
        images, labels, index = style_family.style_images(
            k, RESOLUTION, args.train_per_style + args.refs, args.data_seed
        )
        names = [f"style{k}-digit-{i:04d}" for i in index]
        train = slice(0, args.train_per_style)
        style_family.write_folder(
            os.path.join(root, f"style{k}"), images[train], labels[train], names[train]
        )
        refs[k] = (images[args.train_per_style :], labels[args.train_per_style :])
        if k != style_family.UNSEEN:
            train_images.append(images[train])
            train_labels.append(labels[train])
            train_names += names[train]
            train_ids[k] = names[train]
        del style
    style_family.write_folder(
        os.path.join(root, "train"),
        np.concatenate(train_images),
        np.concatenate(train_labels),
        train_names,
    )
    return {"refs": refs, "train_ids": train_ids}


def encoder_config(args, seed: int, stage: int, head: str = "linear"):
    config = style_encoder.get_config()
    config.seed = seed
    config.stage = stage
    config.model.init_from = args.base
    config.model.resolution = RESOLUTION
    config.data.source = "folder"
    config.data.path = os.path.join(args.out, "data", "train")
    config.data.random_flip = False
    config.style.tower = "tiny"
    config.style.head = head
    for k in (1, 2, 3):
        config[f"stage{k}"].batch_size = 8
    config.stage1.steps_per_batch = args.steps_per_batch
    config.stage2.epochs = args.stage2_epochs
    config.stage3.epochs = args.stage3_epochs
    config.checkpoint.every = 0
    config.log.every = 20
    config.mesh.data = 1
    sample_settings(config.sample)
    return config


def sample_settings(group) -> None:
    """The style benchmark's sampler for the digits base."""
    group.scheduler = "ddim"
    group.num_steps = 20
    group.guidance_scale = 3.0
    group.size = 0
    group.batch_per_device = 64


class Base:
    """The frozen base with the placeholder token, and a jitted draw from spliced tokens."""

    def __init__(self, path: str):
        trained = runs.load_trained(path)
        self.fingerprint = params_fingerprint(trained.params)
        self.model, params, self.placeholder_id = splice.placeholder_token(
            trained.model, trained.params, "sks"
        )
        self.params = {k: params[k] for k in ("unet", "vae", "text_encoder")}
        group = style_encoder.get_config().sample
        sample_settings(group)
        self.settings = sampling.SamplerSettings.from_config(group)
        denoise = sampling.make_denoise_fn(self.model, self.settings)
        model, sks = self.model, self.placeholder_id

        def guided(params, rows, uncond_ids, combine, image_seeds, seed):
            """Denoise with contexts (∅, *rows): the unconditional one broadcast first."""
            uncond = model.encode_text(params["text_encoder"], uncond_ids)
            uncond = jnp.broadcast_to(uncond, rows[0].shape)
            contexts = jnp.stack([r.astype(rows[-1].dtype) for r in (uncond, *rows)], axis=1)
            return denoise(params, contexts, combine, image_seeds, seed)

        def spliced(params, styled_ids, tokens):
            return splice.encode_spliced(model, params["text_encoder"], styled_ids, tokens, sks)

        cfg = sampling.classifier_free(self.settings.guidance_scale)
        # The paper's dual guidance: s_t on the content prompt, DUAL_STYLE_SCALE on the style.
        dual = generate_lib.dual_guidance(self.settings.guidance_scale, DUAL_STYLE_SCALE)

        def draw(params, tokens, styled_ids, uncond_ids, image_seeds, seed):
            rows = [spliced(params, styled_ids, tokens)]
            return guided(params, rows, uncond_ids, cfg, image_seeds, seed)

        def draw_text(params, ids, uncond_ids, image_seeds, seed):
            rows = [model.encode_text(params["text_encoder"], ids)]
            return guided(params, rows, uncond_ids, cfg, image_seeds, seed)

        def draw_dual(params, tokens, styled_ids, text_ids, uncond_ids, image_seeds, seed):
            text = model.encode_text(params["text_encoder"], text_ids)
            rows = [text, spliced(params, styled_ids, tokens)]
            return guided(params, rows, uncond_ids, dual, image_seeds, seed)

        self._draw = jax.jit(draw)
        self._draw_text = jax.jit(draw_text)
        self._draw_dual = jax.jit(draw_dual)
        self.template = style_encoder.get_config().style.prompt_template
        self.uncond_ids = np.asarray(self.model.tokenize([self.settings.negative_prompt]), np.int32)

    def generate(self, tokens: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """uint8 images, one per row of `tokens` [B, n, D] and digit label."""
        prompts = [
            self.template.format(caption=digits.caption(int(d)), style="sks") for d in labels
        ]
        ids = np.asarray(self.model.tokenize(prompts), np.int32)
        out = self._draw(
            self.params,
            jnp.asarray(tokens),
            ids,
            self.uncond_ids,
            np.arange(len(labels), dtype=np.uint32),
            np.uint32(seed),
        )
        return sampling.to_uint8(np.asarray(out))

    def generate_dual(self, tokens: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """As `generate`, with dual guidance (content prompt = the digit caption)."""
        captions = [digits.caption(int(d)) for d in labels]
        styled = [self.template.format(caption=c, style="sks") for c in captions]
        out = self._draw_dual(
            self.params,
            jnp.asarray(tokens),
            np.asarray(self.model.tokenize(styled), np.int32),
            np.asarray(self.model.tokenize(captions), np.int32),
            self.uncond_ids,
            np.arange(len(labels), dtype=np.uint32),
            np.uint32(seed),
        )
        return sampling.to_uint8(np.asarray(out))

    def generate_text(self, prompts: list[str], seed: int) -> np.ndarray:
        """uint8 images of plain prompts (no spliced tokens), one per prompt."""
        ids = np.asarray(self.model.tokenize(prompts), np.int32)
        out = self._draw_text(
            self.params,
            ids,
            self.uncond_ids,
            np.arange(len(prompts), dtype=np.uint32),
            np.uint32(seed),
        )
        return sampling.to_uint8(np.asarray(out))


def eval_jobs(refs: dict, styles: list[int]) -> list[tuple[int, int, int]]:
    """(style, reference index, digit) of every image drawn."""
    return [(k, r, d) for k in styles for r in range(len(refs[k][0])) for d in range(10)]


def score_images(images, jobs, scorer, classifier) -> dict:
    out = {}
    styles = np.asarray([k for k, _, _ in jobs])
    labels = np.asarray([d for _, _, d in jobs])
    for k in sorted(set(styles.tolist())):
        mask = styles == k
        s = scorer.scores(images[mask], k)
        out[f"style_{k}"] = float(s["style"].mean())
        out[f"palette_distance_{k}"] = float(s["palette_distance"].mean())
        out[f"content_{k}"] = classifier.accuracy(images[mask], labels[mask])
        # Classified as plain digits (the scorer's null class): no style at all.
        predicted = scorer.predict(images[mask])
        out[f"plain_{k}"] = float((predicted == style_family.PLAIN).mean())
        # Which class the images of style k's references get (styles, then plain): a
        # method that draws one style for every reference shows here.
        out[f"classes_{k}"] = np.bincount(predicted, minlength=style_family.PLAIN + 1).tolist()
    seen = [k for k in sorted(set(styles.tolist())) if k != style_family.UNSEEN]
    for name in ("style", "palette_distance", "content", "plain"):
        if seen:
            out[f"{name}_seen"] = float(np.mean([out[f"{name}_{k}"] for k in seen]))
        if style_family.UNSEEN in styles:
            out[f"{name}_unseen"] = out[f"{name}_{style_family.UNSEEN}"]
    return out


def stage1_fit(args, base: Base, workdir: str, seed: int, draws: int = 8) -> dict:
    """Denoising loss of every training image with its trained stage-1 vectors and with
    the initial ones (the public code's saved file), on fixed draws."""
    where = run_lib.stage_dir(workdir, 1)
    meta = checkpoint.load_metadata(where)
    shape = tuple(meta["checksums"][run_lib.BANK]["shape"])
    abstract = {"bank": jax.ShapeDtypeStruct(shape, jnp.float32)}
    bank, _ = checkpoint.restore_trainable(where, abstract)
    config = encoder_config(args, seed, 1)
    init_rng, _ = runs.run_keys(seed)
    bank_rng, _ = jax.random.split(jax.random.fold_in(init_rng, 1))
    initial = stages.init_bank(bank_rng, shape[0], shape[1], shape[2], config.style.init_std)
    from nsync_jax.data import sources

    examples = sources.load_positives(config.data, RESOLUTION)
    prompts = [base.template.format(caption=c, style="sks") for c in examples.captions]
    ids = np.asarray(base.model.tokenize(prompts), np.int32)
    pixels = to_pixels(np.stack([examples.image(i) for i in range(len(examples))]))
    per_image = style_encoder_stage1.make_per_image_loss(
        base.model, base.placeholder_id, seed, draws
    )
    trained = np.asarray(per_image(base.params, bank["bank"], pixels, ids))
    untrained = np.asarray(per_image(base.params, initial["bank"], pixels, ids))
    curve = []
    metrics_path = os.path.join(where, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                record = json.loads(line)
                if "loss" in record:
                    curve.append({"step": record.get("step"), "loss": record["loss"]})
    return {
        "loss_trained": float(trained.mean()),
        "loss_initial_vectors": float(untrained.mean()),
        "relative_change": float(trained.mean() / untrained.mean() - 1.0),
        "images_improved": int((trained < untrained).sum()),
        "images": int(len(trained)),
        "bank_change_rms": float(
            np.sqrt(np.mean((np.asarray(bank["bank"]) - initial["bank"]) ** 2))
        ),
        "train_loss_curve": curve,
        "bank": np.asarray(bank["bank"]),
        "ids": list(examples.ids),
    }


def encoder_tokens(
    workdir: str, stage: int, head: str, args, seed: int, pixels, width: int
) -> np.ndarray:
    """The trained encoder's tokens [B, n, D] of reference images uint8 [B, R, R, 3]."""
    config = encoder_config(args, seed, stage, head)
    where = run_lib.stage_dir(workdir, stage)
    encoder, initial = encoder_lib.build(config.style, width, jax.random.key(0))
    params, _ = checkpoint.restore_trainable(where, checkpoint.abstract_like(initial))
    inputs = encoder_lib.tower_inputs(to_pixels(pixels), encoder.vision_config.image_size)
    return np.asarray(encoder.apply({"params": params}, inputs))


def train_encoder(args, seed: int, head: str) -> str:
    """Stages 1-3 (stage 1 shared by both heads); returns the run's workdir. A stage
    whose checkpoint reached its planned steps is not set up again."""
    workdir = os.path.join(args.out, "runs", f"seed{seed}" + ("" if head == "linear" else "-slice"))
    devices = jax.devices()[:1]
    images = args.train_per_style * len(style_family.SEEN)

    def train(stage):
        config = encoder_config(args, seed, stage, head)
        step = checkpoint.latest_step(run_lib.stage_dir(workdir, stage))
        if step is None or step < run_lib.planned_steps(config, stage, images):
            run_lib.train_stage(config, workdir, devices)

    if head == "linear":
        train(1)
    else:
        os.makedirs(workdir, exist_ok=True)
        link = os.path.join(workdir, "stage1")
        if not os.path.exists(link):
            os.symlink(os.path.join("..", f"seed{seed}", "stage1"), link)
    for stage in (2, 3):
        train(stage)
    return workdir


def ti_config(args, seed: int, k: int):
    config = base_config("", 0, "frame")
    config.seed = seed
    config.model.init_from = args.base
    config.data.source = "folder"
    config.data.path = os.path.join(args.out, "data", f"style{k}")
    config.data.random_flip = False
    config.train.mode = "finetune"
    config.train.scope = "textual_inversion"
    config.train.prompt_template = "{caption} in the style of {style}"
    config.train.initializer_token = "painting"
    config.train.batch_size = 8
    config.train.num_steps = args.ti_steps
    config.optim.learning_rate = 5e-3
    config.optim.weight_decay = 1e-2
    return config


def run_textual_inversion(
    args, seed: int, refs, jobs, scorer, classifier
) -> tuple[dict, np.ndarray]:
    images = np.zeros((len(jobs), RESOLUTION, RESOLUTION, 3), np.uint8)
    timings = {}
    for k in args.eval_styles:
        tick = time.perf_counter()
        config = ti_config(args, seed, k)
        trainer = train.setup(config)
        state = loop.run(
            trainer, trainer.state, config.train.num_steps, [loop.CheckFinite(every=0)]
        )
        rows = [i for i, (s, _, _) in enumerate(jobs) if s == k]
        prompts = [
            config.train.prompt_template.format(
                caption=digits.caption(jobs[i][2]), style=config.train.style_token
            )
            for i in rows
        ]
        params = trainer.scope.merge(state.trainable, state.frozen)
        sampler = sampling.make_sampler(config, config.sample, trainer.model, params)
        images[rows] = sampler.generate(prompts, list(range(len(rows))), progress_bar=False)
        timings[f"style{k}_seconds"] = time.perf_counter() - tick
    return timings, images


def run_seed(args, seed: int, base: Base, data: dict, scorer, classifier) -> None:
    parts = os.path.join(args.out, "parts")
    os.makedirs(parts, exist_ok=True)
    refs = data["refs"]
    jobs = eval_jobs(refs, args.eval_styles)
    pixels = np.stack([refs[k][0][r] for k, r, _ in jobs])
    labels = np.asarray([d for _, _, d in jobs])
    grids = os.path.join(args.out, "grids")
    os.makedirs(grids, exist_ok=True)

    def write(method, record, images, drawn=jobs):
        record.update({"seed": seed, "method": method})
        if seed == min(args.seeds):
            save_grid(images, drawn, os.path.join(grids, f"{method}.png"))
        with open(part_path(parts, key_of(method), seed), "w") as f:
            json.dump(record, f)

    def done(method):
        return os.path.exists(part_path(parts, key_of(method), seed))

    for head in ("linear", "slice"):
        methods = ("stage1", "stage2", "stage3") if head == "linear" else ("stage3-slice",)
        if all(done(m) for m in methods):
            continue
        tick = time.perf_counter()
        workdir = train_encoder(args, seed, head)
        train_seconds = time.perf_counter() - tick
        if head == "linear" and not done("stage1"):
            fit = stage1_fit(args, base, workdir, seed)
            bank, ids = fit.pop("bank"), fit.pop("ids")
            # Stage 1 has no encoder: a seen style's r-th reference borrows the vectors of
            # the style's r-th training image.
            tokens, keep = [], []
            for i, (k, r, _) in enumerate(jobs):
                if k in data["train_ids"]:
                    tokens.append(bank[ids.index(data["train_ids"][k][r] + ".png")])
                    keep.append(i)
            sub = [jobs[i] for i in keep]
            images = base.generate(np.stack(tokens), labels[keep], seed)
            record = {"fit": fit, "scores": score_images(images, sub, scorer, classifier)}
            record["train_seconds"] = train_seconds
            write("stage1", record, images, sub)
        stage_list = (2, 3) if head == "linear" else (3,)
        for stage in stage_list:
            method = f"stage{stage}" if head == "linear" else "stage3-slice"
            if done(method):
                continue
            width = base.model.text_encoder.config.hidden_size
            tokens = encoder_tokens(workdir, stage, head, args, seed, pixels, width)
            images = base.generate(tokens, labels, seed)
            record = {
                "scores": score_images(images, jobs, scorer, classifier),
                "token_spread": float(np.std(tokens, axis=0).mean()),  # 0: one output for all.
                "train_seconds": train_seconds,
            }
            write(method, record, images)
    if not done("stage3-dual"):  # Stage 3's tokens with dual guidance.
        workdir = os.path.join(args.out, "runs", f"seed{seed}")
        width = base.model.text_encoder.config.hidden_size
        tokens = encoder_tokens(workdir, 3, "linear", args, seed, pixels, width)
        images = base.generate_dual(tokens, labels, seed)
        write("stage3-dual", {"scores": score_images(images, jobs, scorer, classifier)}, images)
    if not done("words"):  # What the base draws from the style's own caption words.
        prompts = [style_family.palette_caption(d, style_family.STYLES[k]) for k, _, d in jobs]
        images = base.generate_text(prompts, seed)
        write("words", {"scores": score_images(images, jobs, scorer, classifier)}, images)
    if not done("textual_inversion"):
        timings, images = run_textual_inversion(args, seed, refs, jobs, scorer, classifier)
        record = {"scores": score_images(images, jobs, scorer, classifier), "timings": timings}
        write("textual_inversion", record, images)


def save_grid(images: np.ndarray, jobs, path: str) -> None:
    big = [np.kron(image, np.ones((6, 6, 1), np.uint8)) for image in images]
    labels = [f"s{k} r{r} d{d}" for k, r, d in jobs]
    sampling.labelled_grid(big, labels, columns=10).save(path)


def collect(out: str) -> dict[str, list[dict]]:
    """Every finished (method, seed) under <out>/parts (style_benchmark's part layout)."""
    found: dict[str, list[dict]] = {}
    parts = os.path.join(out, "parts")
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else ():
        with open(os.path.join(parts, name)) as f:
            record = json.load(f)
        found.setdefault(record["method"], []).append(record)
    return {m: sorted(found[m], key=lambda r: r["seed"]) for m in METHODS if m in found}


def summarize(results: dict) -> dict:
    summary = {}
    for method, records in results.items():
        names = sorted({k for r in records for k in r["scores"]})
        row = {
            n: mean_std_interval([r["scores"][n] for r in records if n in r["scores"]])
            for n in names
            if not n.startswith("classes_")
        }
        for n in names:  # Class counts: summed over seeds.
            if n.startswith("classes_"):
                row[n] = np.sum([r["scores"][n] for r in records if n in r["scores"]], 0).tolist()
        if method == "stage1":
            for n in ("loss_trained", "loss_initial_vectors", "relative_change"):
                row[n] = mean_std_interval([r["fit"][n] for r in records])
        row["seeds"] = [r["seed"] for r in records]
        summary[method] = row
    return summary


def table(summary: dict, refs_real: dict) -> str:
    columns = [
        ("style_seen", "style (seen)"),
        ("style_unseen", "style (unseen)"),
        ("palette_distance_seen", "palette dist (seen)"),
        ("palette_distance_unseen", "palette dist (unseen)"),
        ("content_seen", "content (seen)"),
        ("content_unseen", "content (unseen)"),
        ("plain_seen", "plain (seen)"),
        ("plain_unseen", "plain (unseen)"),
    ]
    lines = [
        "| method | seeds | " + " | ".join(c[1] for c in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    rows = dict(summary)
    for name, row in [("real references", refs_real)] + list(rows.items()):
        cells = []
        for c, _ in columns:
            if c not in row:
                cells.append("n/a")
                continue
            value = row[c]
            mean, _, half = value if isinstance(value, (list, tuple)) else (value, 0.0, 0.0)
            cells.append(f"{mean:.2f} ± {half:.2f}" if half else f"{mean:.2f}")
        seeds = row.get("seeds", "-")
        lines.append(
            f"| {name} | {len(seeds) if isinstance(seeds, list) else seeds} | "
            + " | ".join(cells)
            + " |"
        )
    fit = summary.get("stage1")
    if fit:
        lines += [
            "",
            "| stage 1 fit (training images, fixed draws) | mean ± 95 % half-width |",
            "|---|---|",
        ]
        for n in ("loss_trained", "loss_initial_vectors", "relative_change"):
            mean, _, half = fit[n]
            lines.append(f"| {n} | {mean:.4f} ± {half:.4f} |")
    classes = [f"s{k}" for k in range(len(style_family.STYLES))] + ["plain"]
    confusion = [
        (method, k, row[f"classes_{k}"])
        for method, row in summary.items()
        for k in range(len(style_family.STYLES))
        if f"classes_{k}" in row
    ]
    if confusion:
        lines += [
            "",
            "Classes the scorer gives each method's images, by reference style (all seeds):",
            "",
            "| method | reference style | " + " | ".join(classes) + " |",
            "|---" * (len(classes) + 2) + "|",
        ]
        for method, k, counts in confusion:
            unseen = " (unseen)" if k == style_family.UNSEEN else ""
            lines.append(f"| {method} | {k}{unseen} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/style_encoder_digits")
    parser.add_argument("--base", default=DEFAULT_BASE, help="Pretrained digits base (workdir).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="Micro sizes: a smoke run.")
    parser.add_argument("--train_per_style", type=int, default=32)
    parser.add_argument("--refs", type=int, default=2, help="Held-out references per style.")
    parser.add_argument("--steps_per_batch", type=int, default=200)
    parser.add_argument("--stage2_epochs", type=int, default=10)
    parser.add_argument("--stage3_epochs", type=int, default=5)
    parser.add_argument("--ti_steps", type=int, default=300)
    parser.add_argument("--eval_styles", type=int, nargs="+", default=[0, style_family.UNSEEN])
    parser.add_argument("--data_seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.train_per_style, args.refs = 8, 1
        args.steps_per_batch, args.stage2_epochs, args.stage3_epochs = 10, 4, 2
        args.ti_steps = 20
    cli.quiet_library_logs()
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    setting = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "quick")}
    check_setting(args.out, setting)
    data = make_data(os.path.join(args.out, "data"), args)
    scorer = style_family.StyleScorer(RESOLUTION)
    classifier = style_metrics.ContentClassifier(RESOLUTION)
    base = Base(args.base)
    refs = data["refs"]
    jobs = eval_jobs(refs, args.eval_styles)
    real = {}
    for k in args.eval_styles:  # What the scorers give the references themselves.
        images, labels = refs[k]
        s = scorer.scores(images, k)
        key = "unseen" if k == style_family.UNSEEN else "seen"
        real[f"style_{key}"] = float(s["style"].mean())
        real[f"palette_distance_{key}"] = float(s["palette_distance"].mean())
        real[f"content_{key}"] = classifier.accuracy(images, labels)
        real[f"plain_{key}"] = float((scorer.predict(images) == style_family.PLAIN).mean())
    del jobs
    timings = {}
    for seed in args.seeds:
        tick = time.perf_counter()
        run_seed(args, seed, base, data, scorer, classifier)
        timings[f"seed{seed}_seconds"] = time.perf_counter() - tick
    results = collect(args.out)
    summary = summarize(results)
    timings["total_seconds"] = time.perf_counter() - start
    record = {
        "command": " ".join(sys.argv),
        "setting": setting,
        "quick": args.quick,
        "versions": {
            "python": platform.python_version(),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "numpy": np.__version__,
        },
        "base": args.base,
        "base_fingerprint": base.fingerprint,
        "styles": [dataclasses.asdict(s) for s in style_family.STYLES],
        "unseen_style": style_family.UNSEEN,
        "style_scorer_test_accuracy": scorer.test_accuracy,
        "content_classifier_test_accuracy": classifier.test_accuracy,
        "real_references": real,
        "timings_this_sitting": timings,
        "summary": summary,
        "runs": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(summary, real) + "\n")
    print(table(summary, real))
    print(f"wrote {args.out} in {timings['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
