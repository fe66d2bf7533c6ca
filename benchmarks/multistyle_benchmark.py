"""Several styles in one run on the digits testbed: fine-tuning, NSYNC, SupCon, both (CPU).

The set-up of `style_benchmark.py` (docs/style_benchmark.md) with three styles at once:

1. Base model: the tiny pixel-space SD pretrained on plain digits (`style_benchmark.
   base_config`), cached in <cache>/base; or `--base` (e.g. `palette_base.py`'s, which
   can draw colours and band patterns named in its captions).
2. Styles: digits of classes 0-4 in three renderings (`data/digits.py`): `palette` (navy
   and orange, no stripes), `stripes` (grey, striped), `styled` (both); `--style_count`
   images each, one word each (`<palette>`, `<stripes>`, `<styled>`), label = style.
   The UNet is shared (`unet` scope): the setting where styles bleed into each other.
3. Negatives: the base model's images for every style example's caption (one store).
4. Methods: `finetune`, `nsync` (paper rule), `supcon` (fine-tuning + SupCon over style
   labels, `--supcon_weight`, noise views, `--supcon_encoder`: the tiny random image
   encoder or a trained one, `supcon_encoder.py`), `nsync+supcon` (SupCon added after the
   projection) and `nsync+supcon-before` (before it), each for `--steps` steps and each
   seed, in `--scope` (`unet`, `lora`, `textual_inversion`, `lora_ti`), through
   `train.setup` and `loop.run` as style_benchmark does.
5. Scores of samples for every style word and every digit 0-9 (`style_metrics`):
   per-style style score (the ingredient(s) the style has: palette → palette score,
   stripes → stripe score, styled → their mean), cross-style leakage (the ingredient a
   style does not have: stripes under `<palette>`, palette under `<stripes>`; their
   mean), and content accuracy (the classifier reads the prompted digit).

Writes results.json, table.md, a plot and image grids to --out:

    python benchmarks/multistyle_benchmark.py --out benchmarks/results/multistyle_3seeds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import style_benchmark  # benchmarks/style_benchmark.py: run as `python benchmarks/...`.
import style_metrics

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsync_jax import checkpoint, cli, loop, negatives, sampling, train  # noqa: E402
from nsync_jax.data import digits  # noqa: E402

RENDERINGS = ("palette", "stripes", "styled")
# Which style_metrics score is the style's own, and which measures leakage into it.
OWN = {"palette": "palette", "stripes": "stripes", "styled": "style"}
LEAK = {"palette": "stripes", "stripes": "palette"}
METHODS = {  # name: (mode, supcon on, SupCon gradient projected with g+)
    "finetune": ("finetune", False, False),
    "nsync": ("nsync", False, False),
    "supcon": ("finetune", True, False),
    "nsync+supcon": ("nsync", True, False),
    "nsync+supcon-before": ("nsync", True, True),
}
DEFAULT_METHODS = ("finetune", "nsync", "supcon", "nsync+supcon")
SCOPES = ("unet", "lora", "textual_inversion", "lora_ti")


def token(rendering: str) -> str:
    return f"<{rendering}>"


def multistyle_config(args, method: str, steps: int):
    config = style_benchmark.base_config(args.cache, args.base_steps, "original")
    config.model.init_from = args.base or os.path.join(args.cache, "base")
    config.negatives.source = "store"
    config.negatives.path = os.path.join(args.cache, "negatives")
    config.data.digits_classes = style_benchmark.STYLE_CLASSES
    config.data.digits_count = args.style_count
    config.data.styles = tuple(
        {"digits_rendering": r, "token": token(r), "label": k} for k, r in enumerate(RENDERINGS)
    )
    mode, supcon, projected = METHODS[method]
    config.train.mode = mode
    config.nsync.rule = "paper"
    config.train.scope = args.scope
    config.train.initializer_token = "drawing"
    config.train.prompt_template = "{caption} in the style of {style}"
    config.train.batch_size = 12
    config.train.num_steps = steps
    # lora_ti trains LoRA and tokens: LoRA's rate.
    rate_of = {"lora_ti": "lora"}.get(args.scope, args.scope)
    config.optim.learning_rate = style_benchmark.LEARNING_RATES[rate_of]
    config.optim.weight_decay = 1e-2
    if supcon:
        config.train.supcon_weight = args.supcon_weight
        config.train.supcon_encoder = args.supcon_encoder
        config.train.supcon_views = "noise"
        config.train.supcon_projected = projected
    return config


def eval_prompts(config, per_class: int):
    labels = np.repeat(np.arange(10), per_class)
    prompts = {
        r: [
            config.train.prompt_template.format(caption=digits.caption(int(d)), style=token(r))
            for d in labels
        ]  # fmt: skip
        for r in RENDERINGS
    }
    return prompts, labels


def score(images_by_style, labels, reference, classifier) -> dict[str, float]:
    out = {}
    own, leak, content = [], [], []
    for rendering, images in images_by_style.items():
        scores = style_metrics.style_scores(images, reference)
        correct = classifier.predict(images) == labels
        for name, values in scores.items():
            out[f"{rendering}/{name}"] = float(values.mean())
        out[f"{rendering}/content"] = float(correct.mean())
        own.append(out[f"{rendering}/{OWN[rendering]}"])
        content.append(out[f"{rendering}/content"])
        if rendering in LEAK:
            leak.append(out[f"{rendering}/{LEAK[rendering]}"])
    out["own_style"] = float(np.mean(own))
    if leak:  # `styled` alone has both ingredients: nothing can leak into it.
        out["leakage"] = float(np.mean(leak))
    out["content"] = float(np.mean(content))
    return out


class Diagnostics(loop.Hook):
    """Every 10th step's metrics, fetched when the run ends (no per-step sync)."""

    def __init__(self):
        self.pending, self.rows = [], []

    def after_step(self, step, state, metrics):
        if step % 10 == 0:
            self.pending.append(metrics)

    def close(self):
        self.rows = [{k: float(v) for k, v in row.items()} for row in jax.device_get(self.pending)]


def run_method(config, seeds, eval_steps, per_class, reference, classifier, grid_path):
    trainer = train.setup(config)
    initial = jax.device_get(trainer.state)
    prompts, labels = eval_prompts(config, per_class)
    params = trainer.scope.merge(trainer.state.trainable, trainer.state.frozen)
    sampler = sampling.make_sampler(config, config.sample, trainer.model, params)
    image_seeds = list(range(len(labels)))
    results = []
    for seed in seeds:
        seeded, state = trainer.reseeded(seed, jax.device_put(initial, trainer.state_sharding))
        curve, last = [], {}
        timer = loop.StepTimer()
        diagnostics = Diagnostics()

        def evaluate(step, state, timer=timer, curve=curve, last=last):
            sampler.set_params(trainer.scope.merge(state.trainable, state.frozen))
            images = {r: sampler.generate(prompts[r], image_seeds) for r in RENDERINGS}
            curve.append({"step": step, **score(images, labels, reference, classifier)})
            last.update(images)
            timer.restart()

        start = time.perf_counter()
        evaluate(0, state)
        hooks = [
            timer,
            diagnostics,
            loop.CheckFinite(every=0),
            loop.AtSteps(evaluate, [s for s in eval_steps if s > 0]),
        ]
        state = loop.run(seeded, state, config.train.num_steps, hooks)
        if seed == seeds[0]:
            for r in RENDERINGS:
                style_benchmark.save_grid(
                    last[r], labels, per_class, grid_path.replace(".png", f"_{r}.png")
                )
        rest = timer.seconds[1:]
        means = {
            k: float(np.mean([row[k] for row in diagnostics.rows]))
            for k in (
                "grad_norm_diffusion",
                "grad_norm_aux",
                "cosine_aux",
                "cosine",
                "loss_supcon",
                "loss_pos",
            )  # fmt: skip
            if diagnostics.rows and k in diagnostics.rows[0]
        }
        results.append(
            {
                "seed": seed,
                "curve": curve,
                "final": curve[-1],
                "diagnostics": means,
                "wall_seconds": time.perf_counter() - start,
                "step_seconds": sum(rest) / max(1, len(rest)),
            }
        )
    return results


COLUMNS = [
    ("own_style", "own style ↑"),
    ("leakage", "leakage ↓"),
    ("content", "content ↑"),
    ("palette/palette", "palette: palette"),
    ("stripes/stripes", "stripes: stripes"),
    ("styled/style", "styled: style"),
    ("step_seconds", "step s"),
]


def table(summary: dict, seeds: int) -> str:
    return style_benchmark.markdown_table(summary, COLUMNS, seeds, "method")


def plot(summary: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, row in summary.items():
        for ax, (x, y) in zip(axes, [("own_style", "leakage"), ("own_style", "content")],
                              strict=True):  # fmt: skip
            ax.errorbar(row[x][0], row[y][0], xerr=row[x][1], yerr=row[y][1], fmt="o",
                        capsize=3, label=key)  # fmt: skip
            ax.set(xlabel=x, ylabel=y)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "style_leakage_content.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/multistyle")
    parser.add_argument("--cache", default="/tmp/nsync-multistyle-bench")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--base_steps", type=int, default=1200)
    parser.add_argument("--style_count", type=int, default=40)
    parser.add_argument("--per_class", type=int, default=4)
    parser.add_argument("--evals", type=int, default=3)
    parser.add_argument("--supcon_weight", type=float, default=0.1)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=", ".join(METHODS))
    parser.add_argument(
        "--scope",
        default="unet",
        choices=SCOPES,
        help="what trains: the shared UNet or LoRA (style words in the prompt), or a "
        "learned token per style (textual_inversion; lora_ti also a shared LoRA)",
    )
    parser.add_argument(
        "--supcon_encoder",
        default="tiny",
        help="train.supcon_encoder: 'tiny' (random weights) or a CLIP folder, e.g. the "
        "tower benchmarks/supcon_encoder.py trains on the renderings",
    )
    parser.add_argument(
        "--base",
        default="",
        help="a pretrained digits base (workdir, e.g. palette_base.py's); default: the "
        "plain-digits base trained here",
    )
    args = parser.parse_args()
    cli.quiet_library_logs()
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    timings = {}
    tick = time.perf_counter()
    if args.base:  # Negatives are the base's: one cache folder per base.
        digest = hashlib.sha256(os.path.abspath(args.base).encode()).hexdigest()[:12]
        args.cache = os.path.join(args.cache, f"base-{digest}")
    else:  # The first testbed's base (plain digits only), cached as style_benchmark does.
        args.cache = os.path.join(args.cache, f"original-base-{args.base_steps}")
        base = style_benchmark.base_config(args.cache, args.base_steps, "original")
        base_dir = os.path.join(args.cache, "base")
        if checkpoint.latest_step(base_dir) != args.base_steps:
            train.train(base, base_dir)
    timings["base_seconds"] = time.perf_counter() - tick

    tick = time.perf_counter()
    store = negatives.generate_store(multistyle_config(args, "nsync", 1))  # Scope-free.
    if not store.complete:
        raise RuntimeError(f"negatives store {store.path} is incomplete")
    timings["negatives_seconds"] = time.perf_counter() - tick

    reference = style_metrics.StyleReference.fit(style_benchmark.RESOLUTION)
    classifier = style_metrics.ContentClassifier(style_benchmark.RESOLUTION)
    print(f"content classifier held-out accuracy: {classifier.test_accuracy:.3f}", flush=True)
    real = {}
    for r in RENDERINGS:
        examples = digits.digits_examples(style_benchmark.RESOLUTION, r, range(10), 40, 0)
        labels = np.asarray([digits.NAMES.index(c.split()[-1]) for c in examples.captions])
        real[r] = score({r: examples.images}, labels, reference, classifier)

    seeds = list(range(args.seeds))
    eval_steps = sorted({round(i * args.steps / (args.evals - 1)) for i in range(args.evals)})
    results = {}
    for method in args.methods.split(","):
        tick = time.perf_counter()
        config = multistyle_config(args, method, args.steps)
        grid = os.path.join(args.out, f"grid_{method}.png")
        results[method] = run_method(
            config, seeds, eval_steps, args.per_class, reference, classifier, grid
        )
        finals = {k: np.mean([r["final"][k] for r in results[method]]) for k in
                  ("own_style", "leakage", "content")}  # fmt: skip
        print(f"{method}: {finals} ({time.perf_counter() - tick:.0f} s)", flush=True)

    summary = {}
    for key, runs_ in results.items():
        finals = {k: [r["final"][k] for r in runs_] for k in runs_[0]["final"] if k != "step"}
        finals["step_seconds"] = [r["step_seconds"] for r in runs_]
        summary[key] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in finals.items()}
    text = table(summary, len(seeds))
    print(text)
    timings["total_seconds"] = time.perf_counter() - started
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    record = {
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
        },  # fmt: skip
        "classifier_test_accuracy": classifier.test_accuracy,
        "real_styles": real,
        "timings": timings,
        "summary": summary,
        "runs": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(summary, args.out)
    print(f"wrote {args.out} in {timings['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
