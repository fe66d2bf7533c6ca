"""Does NSYNC help? A controlled style benchmark on scikit-learn's bundled digits, on CPU.

Every ingredient exists offline (docs/style_benchmark.md explains the design). Two
testbeds (`--testbed`):

- `frame` (default): the base knows a generic "painting" attribute T (a green frame),
  the style set has T **and** a unique style U (navy/orange palette + stripes), and the
  negatives, drawn by the base for "{caption} in the style of painting", share T and the
  content with the positives and lack U: the setting NSYNC's claim is about.
- `original`: the first version: a base of plain digits only, style = U, negatives drawn
  for the bare caption.

1. Base model: a tiny pixel-space Stable Diffusion (UNet + CLIP text encoder + tokenizer +
   DDPM schedule; `model.tiny.identity_vae`) pretrained by our trainer (`finetune`) on all
   1797 digits with content captions ("a handwritten digit seven"); for `frame`, the UNet
   and the text encoder train (`unet_text_encoder`) on every digit plain and framed, the
   framed ones captioned "... in the style of painting". Cached in <cache>/base and reused;
   its fingerprint (a hash of its weights) goes into the results.
2. Style set: `--style_count` digits of classes 0-4 rendered in the style, content captions.
3. Negatives: the frozen base model's images for the style set's captions, made by
   `negatives.generate_store` (cached in <cache>/negatives).
4. Runs: `finetune` and `nsync` with each rule (+ amortized g−, k=4, paper rule), in the
   `unet`, `textual_inversion` and `lora` scopes, each for `--steps` steps and each seed. The
   Trainer from `train.setup` is built once per method; seeds reuse its compiled step
   (`Trainer.reseeded`: fresh state from the base, the seed's data order and step key)
   and run through the trainer's own loop (`loop.run`) with an evaluation hook.
5. Scores (`benchmarks/style_metrics.py`) of images sampled for every class (0-9, so half the
   prompts ask for content the style set never showed), at `--evals` points per run.

Each (method, scope, seed) is written to <out>/parts/ when it finishes and skipped when
found, so a run cut short resumes with the same command, and `--methods/--scopes/--seeds`
split one setting over several sittings; results.json merges every part present.

    python benchmarks/style_benchmark.py --out benchmarks/results/style_quick --quick
    python benchmarks/style_benchmark.py --out benchmarks/results/style_full
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import style_metrics  # benchmarks/style_metrics.py: run as `python benchmarks/...`.

# The repository root (configs/, nsync_jax/) when run as `python benchmarks/...`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from nsync_jax import checkpoint, cli, loop, negatives, runs, sampling, train  # noqa: E402
from nsync_jax.data import digits, negatives_store  # noqa: E402

RESOLUTION = 8  # The digits' own size: CPU time grows with the pixel count.
STYLE_CLASSES = (0, 1, 2, 3, 4)
METHODS = {  # name: (mode, rule, negative_every)
    "finetune": ("finetune", "paper", 1),
    "nsync-paper": ("nsync", "paper", 1),
    "nsync-v41": ("nsync", "v41", 1),
    "nsync-v42": ("nsync", "v42", 1),
    "nsync-conflicting": ("nsync", "conflicting", 1),
    "nsync-paper-k4": ("nsync", "paper", 4),
}
SCOPES = ("unet", "textual_inversion", "lora")
# LoRA: rank and targets from configs/default.py (attention projections).
LEARNING_RATES = {"unet": 3e-4, "textual_inversion": 5e-3, "lora": 1e-3}
TESTBEDS = ("frame", "original")
PAINTING_PROMPT = "{caption} in the style of painting"  # The paper's negative prompt.


def base_config(cache: str, base_steps: int, testbed: str) -> default.ml_collections.ConfigDict:
    """The base model's pretraining run: content captions; for `frame`, every digit also
    framed and captioned "... in the style of painting", with the text encoder training."""
    config = default.get_config()
    config.model.source = "tiny"
    config.model.resolution = RESOLUTION
    config.model.tiny.unet_channels = (32, 64)
    config.model.tiny.vae_channels = (32,)
    config.model.tiny.identity_vae = True
    # The longest prompt is 24 tokens with the tiny tokenizer (it splits "handwritten"
    # and "three"); the style token must not be truncated away. 77 wastes time.
    config.model.tiny.max_length = 32
    config.data.source = "digits"
    config.data.digits_rendering = "plain"
    config.data.random_flip = False  # A mirrored digit is another glyph.
    config.train.mode = "finetune"
    config.train.scope = "unet"
    if testbed == "frame":
        config.data.digits_rendering = "plain+framed"
        config.train.scope = "unet_text_encoder"
    config.train.prompt_template = "{caption}"
    config.train.batch_size = 16
    config.train.num_steps = base_steps
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.checkpoint.every = 0
    config.log.every = 100
    config.mesh.data = 1
    for group in (config.negatives, config.sample):
        group.scheduler = "ddim"
        group.num_steps = 20
        group.guidance_scale = 3.0
        group.size = 0
        group.batch_per_device = 64
    config.negatives.prompt_template = "{caption}"  # What the base was trained to draw.
    return config


def style_config(
    cache: str,
    base_steps: int,
    style_count: int,
    method: str,
    scope: str,
    steps: int,
    testbed: str,
    prompt: str = "{caption} in the style of {style}",
) -> default.ml_collections.ConfigDict:
    config = base_config(cache, base_steps, testbed)
    config.model.init_from = os.path.join(cache, "base")
    config.negatives.source = "store"
    config.negatives.path = os.path.join(cache, "negatives")
    config.data.digits_rendering = "styled"
    if testbed == "frame":  # Positives T + U; negatives the base's T for the same captions.
        config.data.digits_rendering = "styled_framed"
        config.negatives.prompt_template = PAINTING_PROMPT
    config.data.digits_classes = STYLE_CLASSES
    config.data.digits_count = style_count
    mode, rule, every = METHODS[method]
    config.train.mode = mode
    config.nsync.rule = rule
    config.nsync.negative_every = every
    config.train.scope = scope
    config.train.prompt_template = prompt
    config.train.initializer_token = "painting" if testbed == "frame" else "drawing"
    config.train.batch_size = 8
    config.train.num_steps = steps
    config.optim.learning_rate = LEARNING_RATES[scope]
    config.optim.weight_decay = 1e-2
    return config


def eval_prompts(config, per_class: int) -> tuple[list[str], np.ndarray]:
    labels = np.repeat(np.arange(10), per_class)
    prompts = [
        config.train.prompt_template.format(
            caption=digits.caption(int(d)), style=config.train.style_token
        )
        for d in labels
    ]
    return prompts, labels


def score(images, labels, reference, classifier) -> dict[str, float]:
    styles = style_metrics.style_scores(images, reference)
    correct = classifier.predict(images) == labels
    seen = np.isin(labels, STYLE_CLASSES)
    out = {}
    for part, mask in (("all", np.ones_like(seen)), ("seen", seen), ("unseen", ~seen)):
        if not mask.any():  # E.g. the negatives: style-set classes only.
            continue
        for name, values in styles.items():
            out[f"{name}_{part}"] = float(values[mask].mean())
        out[f"content_{part}"] = float(correct[mask].mean())
    return out


def part_path(parts: str, key: str, seed: int) -> str:
    method, scope = key[: -len(")")].split(" (")
    return os.path.join(parts, f"{method}_{scope}_seed{seed}.json")


def run_method(
    config, key, seeds, eval_steps, per_class, reference, classifier, out, samplers
) -> list[dict]:
    """All seeds of one (method, scope): one Trainer and compiled step; one sampler per
    scope (`samplers`, filled on first use), since all methods share its shapes. Each
    seed is `loop.run` from the base state with that seed's data order and step key, and
    is written to <out>/parts/ when done; seeds found there are read, not rerun."""
    parts = os.path.join(out, "parts")
    os.makedirs(parts, exist_ok=True)
    results = {}
    for seed in seeds:
        if os.path.exists(part_path(parts, key, seed)):
            with open(part_path(parts, key, seed)) as f:
                results[seed] = json.load(f)
    todo = [seed for seed in seeds if seed not in results]
    if not todo:
        return [results[seed] for seed in seeds]
    trainer = train.setup(config)
    initial = jax.device_get(trainer.state)
    prompts, labels = eval_prompts(config, per_class)
    if config.train.scope not in samplers:
        params = trainer.scope.merge(trainer.state.trainable, trainer.state.frozen)
        samplers[config.train.scope] = sampling.make_sampler(
            config, config.sample, trainer.model, params
        )
    sampler = samplers[config.train.scope]
    image_seeds = list(range(len(prompts)))
    method, scope = key[: -len(")")].split(" (")
    for seed in todo:
        seeded, state = trainer.reseeded(seed, jax.device_put(initial, trainer.state_sharding))
        curve, last_images = [], None
        timer = loop.StepTimer()

        def evaluate(step, state, timer=timer, curve=curve):
            nonlocal last_images
            sampler.set_params(trainer.scope.merge(state.trainable, state.frozen))
            images = sampler.generate(prompts, image_seeds)
            curve.append({"step": step, **score(images, labels, reference, classifier)})
            last_images = images
            timer.restart()  # Sampling time is not step time.

        start = time.perf_counter()
        evaluate(0, state)
        hooks = [
            timer,
            loop.CheckFinite(every=0),
            loop.AtSteps(evaluate, [s for s in eval_steps if s > 0]),
        ]
        state = loop.run(seeded, state, config.train.num_steps, hooks)
        first, rest = timer.seconds[0], timer.seconds[1:]  # The first includes compilation.
        if seed == 0:
            grid_path = os.path.join(out, f"grid_{method}_{scope}.png")
            save_grid(last_images, labels, per_class, grid_path)
            np.save(grid_path[: -len(".png")] + ".npy", last_images)  # For rescoring.
        results[seed] = {
            "seed": seed,
            "curve": curve,
            "final": curve[-1],
            "wall_seconds": time.perf_counter() - start,
            "step_seconds": sum(rest) / max(1, len(rest)),
            "first_step_seconds": first,
            "final_loss_pos": timer.metrics["loss_pos"],
        }
        with open(part_path(parts, key, seed), "w") as f:
            json.dump(results[seed], f)
    return [results[seed] for seed in seeds]


def params_fingerprint(params) -> str:
    """sha256 of every parameter's bytes, in tree order: equal iff the weights are."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def save_grid(images: np.ndarray, labels: np.ndarray, columns: int, path: str) -> None:
    """Rows of `columns` images per digit, each enlarged 6x (nearest) to be seen."""
    big = [np.kron(image, np.ones((6, 6, 1), np.uint8)) for image in images]
    sampling.labelled_grid(big, [f"prompt {int(d)}" for d in labels], columns=columns).save(path)


def mean_std_interval(values) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the 95 % t-interval of the mean); 0s for n=1."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0, 0.0
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values)))
    return float(values.mean()), std, half


def summarize(results: dict) -> dict:
    """{key: {metric: (mean, std, 95 % half-width)}} over seeds, of the final scores."""
    summary = {}
    for key, runs_ in results.items():
        finals = {k: [r["final"][k] for r in runs_] for k in runs_[0]["final"] if k != "step"}
        summary[key] = {k: mean_std_interval(v) for k, v in finals.items()}
        for k in ("step_seconds", "wall_seconds"):
            summary[key][k] = mean_std_interval([r[k] for r in runs_])
        summary[key]["seeds"] = len(runs_)
    return summary


def table(summary: dict, seeds: int, testbed: str = "original") -> str:
    """Markdown: mean ± the 95 % t-interval's half-width over seeds (mean alone for 1)."""
    columns = [
        ("style_seen", "style 0-4"),
        ("style_unseen", "style 5-9"),
        ("palette_all", "palette"),
        ("stripes_all", "stripes"),
        ("content_seen", "content 0-4"),
        ("content_unseen", "content 5-9"),
        ("step_seconds", "step s"),
    ]
    if testbed == "frame":
        columns = [
            ("style_seen", "U 0-4"),
            ("style_unseen", "U 5-9"),
            ("frame_seen", "T 0-4"),
            ("frame_unseen", "T 5-9"),
            ("content_seen", "content 0-4"),
            ("content_unseen", "content 5-9"),
            ("step_seconds", "step s"),
        ]
    return markdown_table(summary, columns, seeds, "method (scope)")


def markdown_table(summary: dict, columns, seeds: int, label: str) -> str:
    """Rows of `summary` ({key: {metric: (mean, ..., spread)}}) as markdown: the mean, and
    ± the tuple's last value (std or interval half-width) when there are several seeds."""
    lines = [
        f"| {label} | {' | '.join(c[1] for c in columns)} |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for key, row in summary.items():
        cells = []
        for name, _ in columns:
            mean, spread = row[name][0], row[name][-1]
            n = 3 if name == "step_seconds" else 2
            cells.append(f"{mean:.{n}f} ± {spread:.{n}f}" if seeds > 1 else f"{mean:.{n}f}")
        lines.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plots(results: dict, summary: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = [s for s in SCOPES if any(key.endswith(f"({s})") for key in summary)]
    fig, axes = plt.subplots(1, len(scopes), figsize=(5.5 * len(scopes), 4.5), squeeze=False)
    for ax, scope in zip(axes[0], scopes, strict=True):
        for key, row in summary.items():
            if not key.endswith(f"({scope})"):
                continue
            x, _, xe = row["style_unseen"]
            y, _, ye = row["content_all"]
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=key.split(" ")[0])
        ax.set(
            xlabel="style on unseen classes 5-9",
            ylabel="content (all classes)",
            title=f"end of training, {scope}",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "style_vs_content.png"), dpi=110)
    plt.close(fig)

    metrics = ("style_seen", "style_unseen", "frame_all", "content_all")
    fig, axes = plt.subplots(
        len(scopes), len(metrics), figsize=(18, 3.5 * len(scopes)), squeeze=False
    )
    for row_axes, scope in zip(axes, scopes, strict=True):
        for ax, metric in zip(row_axes, metrics, strict=True):
            for key, runs_ in results.items():
                if not key.endswith(f"({scope})"):
                    continue
                steps = [p["step"] for p in runs_[0]["curve"]]
                values = np.array([[p[metric] for p in r["curve"]] for r in runs_])
                ax.plot(steps, values.mean(0), marker=".", label=key.split(" ")[0])
            ax.set(title=f"{metric} ({scope})", xlabel="step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)


def collect_parts(out: str) -> dict[str, list[dict]]:
    """Every finished (method, scope, seed) under <out>/parts, as {key: runs by seed}."""
    found: dict[str, list[dict]] = {}
    parts = os.path.join(out, "parts")
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else ():
        method, rest = name[: -len(".json")].split("_", 1)
        scope = rest[: rest.rindex("_seed")]
        with open(os.path.join(parts, name)) as f:
            found.setdefault(f"{method} ({scope})", []).append(json.load(f))
    order = [f"{m} ({s})" for s in SCOPES for m in METHODS]
    return {
        key: sorted(found[key], key=lambda r: r["seed"])
        for key in sorted(found, key=lambda k: order.index(k) if k in order else len(order))
    }


def check_setting(out: str, setting: dict) -> None:
    """The parts in `out` were made with `setting`, or `out` is new: parts of two settings
    must not merge into one table."""
    path = os.path.join(out, "setting.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != setting:
            changed = sorted(
                k for k in setting.keys() | saved.keys() if saved.get(k) != setting.get(k)
            )
            raise SystemExit(
                f"error: {out} holds parts of another setting (differs in {changed}); "
                "use another --out"
            )
        return
    with open(path, "w") as f:
        json.dump(setting, f, indent=1)


def base_references(args, base, reference, classifier) -> tuple[dict, str]:
    """Scores of the base model's samples (content prompts, and for `frame` the painting
    prompt) and the fingerprint of its weights."""
    base_run = runs.load_trained(os.path.join(args.cache, "base"))
    sampler = sampling.make_sampler(base, base.sample, base_run.model, base_run.params)
    labels = np.repeat(np.arange(10), args.per_class)
    captions = [digits.caption(int(d)) for d in labels]
    prompts = {"base model, content prompt": captions}
    if args.testbed == "frame":
        prompts["base model, painting prompt"] = [
            PAINTING_PROMPT.format(caption=c) for c in captions
        ]
    scores = {}
    for name, texts in prompts.items():
        images = sampler.generate(texts, list(range(len(texts))))
        scores[name] = score(images, labels, reference, classifier)
        slug = "base" if "content" in name else "base_painting"
        save_grid(images, labels, args.per_class, os.path.join(args.out, f"grid_{slug}.png"))
    return scores, params_fingerprint(base_run.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/style")
    parser.add_argument("--cache", default="/tmp/nsync-style-bench")
    parser.add_argument("--testbed", default="frame", choices=TESTBEDS)
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps and images")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--base_steps", type=int, default=12000)
    parser.add_argument("--style_count", type=int, default=40)
    parser.add_argument("--per_class", type=int, default=10, help="eval images per digit")
    parser.add_argument("--evals", type=int, default=5, help="eval points per run")
    parser.add_argument(
        "--prompt",
        default="{caption} in the style of {style}",
        help='training and evaluation prompt; "{caption}, {style}" avoids the words that '
        "make the frame testbed's base draw the frame before any training",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--scopes", default=",".join(SCOPES))
    args = parser.parse_args()
    cli.quiet_library_logs()
    if args.quick:
        args.seeds, args.steps, args.per_class, args.evals = 1, 150, 6, 4
        args.base_steps = min(args.base_steps, 1200)
    os.makedirs(args.out, exist_ok=True)
    # The negatives depend on the base model: one cache folder per testbed and base length.
    args.cache = os.path.join(args.cache, f"{args.testbed}-base-{args.base_steps}")
    started = time.perf_counter()
    timings = {}

    tick = time.perf_counter()
    base = base_config(args.cache, args.base_steps, args.testbed)
    base_dir = os.path.join(args.cache, "base")
    if checkpoint.latest_step(base_dir) != args.base_steps:  # Made once, then reused.
        train.train(base, base_dir)
    timings["base_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    probe = style_config(
        args.cache, args.base_steps, args.style_count, "nsync-paper", "unet", 1, args.testbed
    )
    store = negatives.generate_store(probe)
    if not store.complete:
        raise RuntimeError(f"negatives store {store.path} is incomplete")
    timings["negatives_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    reference = style_metrics.StyleReference.fit(RESOLUTION, framed=args.testbed == "frame")
    classifier = style_metrics.ContentClassifier(RESOLUTION)
    timings["scorers_seconds"] = time.perf_counter() - tick
    print(f"content classifier held-out accuracy: {classifier.test_accuracy:.3f}")

    # References: real digits in each rendering, the base model, its negatives.
    ref_scores = {}
    renderings = ("plain", "styled") + (
        ("framed", "styled_framed") if args.testbed == "frame" else ()
    )
    for rendering in renderings:
        real = digits.digits_examples(RESOLUTION, rendering)
        real_labels = np.asarray([digits.NAMES.index(c.split()[-1]) for c in real.captions])
        ref_scores[f"real {rendering} digits"] = score(
            real.images, real_labels, reference, classifier
        )
    negs = negatives_store.load_store(store.path, RESOLUTION)
    neg_images = np.stack([negs.image(i) for i in range(len(negs))])
    neg_labels = np.asarray([digits.NAMES.index(c.split()[-1]) for c in negs.captions])
    ref_scores["negatives (base model)"] = score(neg_images, neg_labels, reference, classifier)
    base_scores, base_fingerprint = base_references(args, base, reference, classifier)
    ref_scores.update(base_scores)
    base_content = base_scores["base model, content prompt"]["content_all"]
    print(f"base {base_fingerprint[:12]}: content {base_content:.3f} on plain prompts", end="")
    if args.testbed == "frame":
        frame = base_scores["base model, painting prompt"]["frame_all"]
        print(f", frame {frame:.3f} on painting prompts", end="")
    print(" (below 0.9 content: train the base longer)" if base_content < 0.9 else "")
    check_setting(
        args.out,
        {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "methods", "scopes", "seeds", "quick")
        }
        | {"base_fingerprint": base_fingerprint},
    )

    seeds = list(range(args.seeds))
    eval_steps = sorted({round(i * args.steps / (args.evals - 1)) for i in range(args.evals)})
    samplers = {}
    for scope in args.scopes.split(","):
        for method in args.methods.split(","):
            key = f"{method} ({scope})"
            tick = time.perf_counter()
            config = style_config(
                args.cache,
                args.base_steps,
                args.style_count,
                method,
                scope,
                args.steps,
                args.testbed,
                args.prompt,
            )
            done = run_method(
                config,
                key,
                seeds,
                eval_steps,
                args.per_class,
                reference,
                classifier,
                args.out,
                samplers,
            )
            final = np.mean([r["final"]["style_unseen"] for r in done])
            content = np.mean([r["final"]["content_all"] for r in done])
            print(
                f"{key}: style(5-9) {final:.3f} content {content:.3f} "
                f"step {done[0]['step_seconds'] * 1e3:.0f} ms "
                f"({time.perf_counter() - tick:.0f} s)",
                flush=True,
            )
    results = collect_parts(args.out)  # Every part made so far, by any sitting.
    summary = summarize(results)
    text = table(summary, max(r["seeds"] for r in summary.values()), args.testbed)
    print(text)
    timings["total_seconds"] = time.perf_counter() - started
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    sittings_path = os.path.join(args.out, "sittings.json")
    sittings = json.load(open(sittings_path)) if os.path.exists(sittings_path) else []
    sittings.append({"command": " ".join(sys.argv), "timings": timings})
    with open(sittings_path, "w") as f:
        json.dump(sittings, f, indent=1)
    record = {
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "diffusers": importlib.metadata.version("diffusers"),
            "transformers": importlib.metadata.version("transformers"),
            "numpy": np.__version__,
        },
        "base_fingerprint": base_fingerprint,
        "sittings": sittings,
        "classifier_test_accuracy": classifier.test_accuracy,
        "stripe_reference_band_ratio": reference.band_ratio,
        "references": ref_scores,
        "timings": timings,
        "summary": summary,
        "runs": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    plots(results, summary, args.out)
    print(f"wrote {args.out} in {timings['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
