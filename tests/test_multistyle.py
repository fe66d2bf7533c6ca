"""Several styles in one run: `data.styles`, one token per style, the SupCon term in the
step, config checks, and a short `launch/train.py` run of the digits form."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, multistyle_digits
from nsync_jax import diffusion, errors, export, runs, style_contrast, supcon, train
from nsync_jax import scope as scope_lib
from nsync_jax import step as step_lib
from nsync_jax.data import pipeline, sources, styles
from nsync_jax.data.examples import Examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(prefix, n, value):
    images = np.full((n, 8, 8, 3), value, np.uint8)
    return Examples(
        tuple(f"{prefix}{i}" for i in range(n)), images, tuple(f"caption {i}" for i in range(n))
    )


def _digits_config(count=6):
    config = multistyle_digits.get_config()
    config.data.digits_count = count
    return config


# --- data ---------------------------------------------------------------------------------------


def test_styled_examples_prefix_ids_and_select_keeps_parts():
    a, b = _examples("x", 3, 10), _examples("x", 2, 200)  # The same ids in two styles.
    both = styles.StyledExamples([a, b])
    assert both.ids == ("style0-x0", "style0-x1", "style0-x2", "style1-x0", "style1-x1")
    assert both.image(3)[0, 0, 0] == 200 and both.image(0)[0, 0, 0] == 10
    picked = both.select(["style1-x1", "style0-x2"])
    assert picked.ids == ("style1-x1", "style0-x2")
    assert picked.image(0)[0, 0, 0] == 200 and "style 0" in picked.name(1)
    with pytest.raises(KeyError, match="style2-x0"):
        both.select(["style2-x0"])
    assert both.fingerprint() != styles.StyledExamples([a, a]).fingerprint()


def test_styled_examples_pass_sizes_and_bucket_shapes_through():
    """Aspect-ratio buckets read sizes and ask for images at a bucket's shape."""
    tall = Examples(("t0",), np.full((1, 16, 8, 3), 7, np.uint8), ("a tall one",))
    both = styles.StyledExamples([_examples("x", 2, 10), tall])
    assert both.size(2) == tall.size(0) == (16, 8) and both.size(0) == (8, 8)
    assert both.image(2, (8, 4)).shape == (8, 4, 3)
    np.testing.assert_array_equal(both.image(2, (8, 4)), tall.image(0, (8, 4)))


def test_load_styled_gives_each_example_its_token_and_label():
    config = _digits_config()
    positives, index = sources.load_styled(config.data, 8)
    assert len(positives) == 3 * 6
    tokens, labels = index.of(positives.ids)
    assert tokens == ("<palette>",) * 6 + ("<stripes>",) * 6 + ("<styled>",) * 6
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 6))
    # The renderings differ: the palette style is navy and orange, stripes grey.
    assert positives.image(0)[..., 2].mean() > positives.image(6)[..., 2].mean()
    # A one-style run: the set of its source, no index.
    config.data.styles = ()
    single, none = sources.load_styled(config.data, 8)
    assert none is None and single.ids[0].startswith("digit-")


@pytest.mark.parametrize(
    "styles_value,match",
    [
        (({"label": 0},), "no \\['token'\\]"),
        (({"token": "<a>", "label": -1},), "label must be an int >= 0"),
        (({"token": "<a>", "label": 0, "nonsense": 1},), "sets \\['nonsense'\\]"),
        (({"token": "<a>", "label": 0, "val_count": 3},), "sets \\['val_count'\\]"),
        (({"token": "<a>", "label": 0}, {"token": "<a>", "label": 1}), "has label 1 here"),
        (("<a>",), "must be a dict"),
    ],
)
def test_bad_styles_are_config_errors(styles_value, match):
    config = default.get_config()
    config.data.styles = styles_value
    with pytest.raises(errors.ConfigError, match=match):
        styles.parse(config.data)


def test_batches_carry_labels_prompts_per_style_and_a_second_caption():
    a, b = _examples("a", 4, 10), _examples("b", 4, 200)
    examples = styles.StyledExamples([a, b])
    index = styles.StyleIndex(
        {i: ("<one>" if i.startswith("style0") else "<two>") for i in examples.ids},
        {i: (0 if i.startswith("style0") else 1) for i in examples.ids},
    )

    def tokenize(prompts):
        return np.asarray([[len(p), hash(p) % 1000] for p in prompts])

    def batches(**kwargs):
        return pipeline.PairedBatches(
            examples, None, tokenize, "{caption} by {style}", "<s*>", 4, 0, False,
            process_index=0, process_count=1, **kwargs,
        )  # fmt: skip

    styled = batches(styles=index, view_template="{style}: {caption}")
    assert styled.prompts[0] == "caption 0 by <one>" and styled.prompts[4] == "caption 0 by <two>"
    for step in range(3):
        batch = styled.batch(step)["positive"]
        # The label of each row is its image's style (the two sets differ in value).
        np.testing.assert_array_equal(batch["label"], (batch["pixels"][:, 0, 0, 0] > 0))
        assert batch["input_ids_view"].shape == batch["input_ids"].shape
    assert styled.view_prompts[4] == "<two>: caption 0"
    plain = batches()
    assert "label" not in plain.batch(0)["positive"] and plain.prompts[0] == "caption 0 by <s*>"
    # Labels are part of what a checkpoint refuses a resume on; one-style data is unchanged.
    assert "labels_sha256" in styled.fingerprint() and "labels_sha256" not in plain.fingerprint()


# --- one token per style ------------------------------------------------------------------------


def test_textual_inversion_learns_one_row_per_style(tiny_sd):
    model, params = tiny_sd
    config = default.get_config()
    tokens = ("<one>", "<two>", "<three>")
    s, model, params = scope_lib.make_scope(config.train, model, params, style_tokens=tokens)
    assert s.token_ids == tuple(model.tokenizer.convert_tokens_to_ids(list(tokens)))
    trainable, frozen = s.split(params)
    assert trainable["token_embedding"].shape[0] == 3
    moved = {"token_embedding": trainable["token_embedding"] + jnp.arange(3.0)[:, None]}
    table = scope_lib._get_path(s.merge(moved, frozen)["text_encoder"], scope_lib._EMBEDDING_PATH)
    for k, token_id in enumerate(s.token_ids):  # Row k is token k's, and only it moved.
        np.testing.assert_allclose(table[token_id], trainable["token_embedding"][k] + k)
    base = scope_lib._get_path(frozen["text_encoder"], scope_lib._EMBEDDING_PATH)
    np.testing.assert_array_equal(table[: s.token_id], base[: s.token_id])
    with pytest.raises(ValueError, match="distinct"):
        scope_lib.add_placeholder_tokens(*tiny_sd, ("<a>", "<a>"), "painting")


def test_export_writes_every_style_token_and_diffusers_loads_them(tiny_sd, tmp_path):
    import diffusers
    import torch

    from nsync_jax import lora_export, torch_files

    model, params = tiny_sd
    config = default.get_config()
    tokens = ("<a>", "<b>")
    s, model, params = scope_lib.make_scope(config.train, model, params, style_tokens=tokens)
    trainable, frozen = s.split(params)
    learned = trainable["token_embedding"] + jnp.asarray([[0.5], [-0.25]])  # Distinct rows.
    out = str(tmp_path / "out")
    export.export_pipeline(model, s.merge({"token_embedding": learned}, frozen), out, scope=s)
    with open(os.path.join(out, torch_files.EMBEDS_INFO_FILE)) as f:
        listed = json.load(f)["tokens"]
    assert [t["placeholder_token"] for t in listed] == list(tokens)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    vocab = len(pipe.tokenizer)
    assert vocab == s.token_id  # The base tokenizer, without the placeholders.
    pipe.load_textual_inversion(
        [os.path.join(out, t["weight_name"]) for t in listed], token=list(tokens)
    )
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()
    for k, token in enumerate(tokens):
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert token_id == vocab + k
        np.testing.assert_allclose(rows[token_id].numpy(), np.asarray(learned[k]), rtol=1e-6)
    base = scope_lib._get_path(frozen["text_encoder"], scope_lib._EMBEDDING_PATH)[:vocab]
    assert torch.equal(rows[:vocab], torch.from_numpy(np.array(base, np.float32)))
    # The evaluation protocol loads every token of the export, given the run's styles.
    from nsync_jax.evaluation import protocol

    eval_config = default.get_config()
    eval_config.model.source, eval_config.model.pretrained = "pretrained", out
    with pytest.raises(ValueError, match="holds 2 style tokens"):
        protocol.load_model(eval_config)
    eval_config.data.styles = tuple({"token": t, "label": k} for k, t in enumerate(tokens))
    under_test = protocol.load_model(eval_config)
    assert under_test.style_token is None  # Each example's style's token.
    ids = under_test.model.tokenizer.convert_tokens_to_ids(list(tokens))
    table = scope_lib._get_path(under_test.params["text_encoder"], scope_lib._EMBEDDING_PATH)
    np.testing.assert_allclose(np.asarray(table)[ids], np.asarray(learned), rtol=1e-6)
    # Pivotal tuning (lora_ti) with several tokens writes the same files beside its LoRA.
    config.train.scope = "lora_ti"
    model, params = tiny_sd
    s, model, params = scope_lib.make_scope(
        config.train, model, params, lora_config=config.lora, style_tokens=tokens
    )
    trainable, _ = s.split(params)
    lora_dir = str(tmp_path / "lora")
    lora_export.export_lora(model, s, trainable, lora_dir)
    with open(os.path.join(lora_dir, torch_files.EMBEDS_INFO_FILE)) as f:
        assert [t["placeholder_token"] for t in json.load(f)["tokens"]] == list(tokens)
    assert all(os.path.exists(os.path.join(lora_dir, torch_files.token_file(k))) for k in (0, 1))


def test_split_prompts_and_evaluation_give_each_example_its_style_token(tmp_path):
    from nsync_jax import sampling
    from nsync_jax.evaluation import protocol

    config = _digits_config(count=2)
    expected = [
        f"a handwritten digit {name} in the style of {s['token']}"
        for s in config.data.styles
        for name in ("zero", "one")
    ]
    assert sampling.split_prompts(config, "train") == expected
    # The evaluation protocol's prompts: each style's token unless one is given.
    examples, index = protocol.split_styled(config, "train")
    tokens = styles.example_tokens(examples.ids, index, config.train.style_token)
    prompts = protocol.prompts_for(config.sample.prompt_template, examples.captions, tokens)
    assert prompts == expected
    assert protocol.prompts_for("{caption} by {style}", ["a", "b"], "X") == ["a by X", "b by X"]
    # Every style reads the split asked for, whatever its own entry said.
    config.data.styles = tuple({**s, "split": "trainA"} for s in config.data.styles)
    split = styles.with_split(config.data, "testA")
    assert split.split == "testA" and {s["split"] for s in split.styles} == {"testA"}
    assert {s["split"] for s in config.data.styles} == {"trainA"}  # A copy.


# --- the SupCon term ----------------------------------------------------------------------------


def test_config_checks_for_styles_and_supcon():
    config = _digits_config()
    train.validate_config(config)
    for field, value, match in [
        ("supcon_encoder", "", "needs train.supcon_encoder"),
        ("supcon_views", "pixels", "supcon_views"),
        ("supcon_temperature", 0.0, "supcon_temperature"),
        ("supcon_weight", -1.0, "supcon_weight"),
        ("prompt_template", "{caption}", "has no {style}"),
    ]:
        bad = _digits_config()
        bad.train[field] = value
        with pytest.raises(errors.ConfigError, match=match):
            train.validate_config(bad)
    one_style = _digits_config()
    one_style.data.styles = ()
    with pytest.raises(errors.ConfigError, match="set data.styles"):
        train.validate_config(one_style)


def test_the_encoder_is_a_hugging_face_clip_folder_or_tiny(tmp_path):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = _digits_config()
    config.train.supcon_encoder = str(tmp_path / "missing")
    with pytest.raises(errors.NotFound, match="is not a folder"):
        train.validate_config(config)
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, image_size=16, patch_size=4, projection_dim=8)  # fmt: skip
    CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "clip")
    config.train.supcon_encoder = str(tmp_path / "clip")
    train.validate_config(config)
    settings = style_contrast.SupconSettings.from_config(config.train)
    encoder, encoder_params = style_contrast.load_encoder(settings, 0)
    assert encoder.projection_dim == 8 and encoder.config.image_size == 16
    pixels = jax.random.uniform(jax.random.key(0), (3, 3, 8, 8), minval=-1, maxval=1)
    embeddings = style_contrast.embed(encoder, encoder_params, pixels)
    assert embeddings.shape == (3, 8)
    np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def digits_model():
    return runs.build_base(_digits_config())


def _supcon_case(digits_model, views):
    """The SupCon term of the digits config on one batch, and its value by hand.

    Returns:
      (aux, params, branch, outputs, draws, by_hand): the term's arguments, and
      `by_hand(params, branch, draws)`, its value from both branches' x̂0 through the
      identity VAE, embedded, then SupCon.
    """
    model, params = digits_model
    config = _digits_config()
    config.train.supcon_views = views
    settings = style_contrast.SupconSettings.from_config(config.train)
    encoder, encoder_params = style_contrast.load_encoder(settings, 0)
    params = {**params, style_contrast.IMAGE_ENCODER: encoder_params}
    aux = style_contrast.make_auxiliary(settings, model, encoder)
    assert aux.projected is False and (aux.draws is None) == (views == "captions")
    schedule = diffusion.make_schedule(model.scheduler_config)
    key = jax.random.key(0)
    b = 6
    pixels = jax.random.uniform(key, (b, 3, 8, 8), minval=-1, maxval=1)
    ids = jnp.asarray(model.tokenize(["a <palette> drawing"] * b), jnp.int32)
    branch = {"pixels": pixels, "input_ids": ids, "input_ids_view": ids[:, ::-1],
              "label": jnp.array([0, 1, 2, 0, 1, 2])}  # fmt: skip

    @jax.jit  # The diffusion forward the step runs before the term (compiled: eager is slow).
    def forward(params):
        latents = model.encode_images(params["vae"], pixels, None)
        noise, t = diffusion.sample_noise(schedule, jax.random.key(1), latents.shape)
        noisy = diffusion.add_noise(schedule, latents, noise, t).noisy
        context = model.encode_text(params["text_encoder"], ids)
        prediction = model.predict_noise(params["unet"], noisy, t, context)
        return {"latents": latents, "noisy": noisy, "timesteps": t, "context": context,
                "prediction": prediction}  # fmt: skip

    outputs = forward(params)
    latents, t, context = outputs["latents"], outputs["timesteps"], outputs["context"]
    draws = {} if aux.draws is None else aux.draws(latents.shape, jax.random.key(2))

    @jax.jit
    def by_hand(params, branch, draws):
        def x0(noisy, timesteps, ctx):
            out = model.predict_noise(params["unet"], noisy, timesteps, ctx)
            return model.decode_latents(
                params["vae"], diffusion.predict_x0(schedule, noisy, timesteps, out)
            )

        if views == "noise":
            noisy2 = diffusion.add_noise(schedule, latents, draws["noise"], draws["timesteps"])
            second = x0(noisy2.noisy, draws["timesteps"], context)
        else:
            ctx2 = model.encode_text(params["text_encoder"], branch["input_ids_view"])
            second = x0(outputs["noisy"], t, ctx2)
        first = x0(outputs["noisy"], t, context)
        feats = jnp.stack(
            [style_contrast.embed(encoder, params[style_contrast.IMAGE_ENCODER], x)
             for x in (first, second)], axis=1,
        )  # fmt: skip
        return supcon.supcon(feats, branch["label"])

    return aux, params, branch, outputs, draws, by_hand


# One form in the default suite; the noise form compiles its own, second set (slow).
@pytest.mark.parametrize("views", ["captions", pytest.param("noise", marks=pytest.mark.slow)])
def test_supcon_term_is_supcon_of_the_x0_embeddings(digits_model, views):
    """The value `loss_supcon` logs, against the same SupCon computed by hand."""
    aux, params, branch, outputs, draws, by_hand = _supcon_case(digits_model, views)
    fn = jax.jit(aux.fn)
    got = fn(params, branch, outputs, draws)
    np.testing.assert_allclose(got, by_hand(params, branch, draws), rtol=1e-5)
    # The labels matter: all distinct gives another value (NT-Xent between the views).
    other = fn(params, {**branch, "label": jnp.arange(len(branch["label"]))}, outputs, draws)
    assert not np.isclose(other, got)


@pytest.mark.slow
@pytest.mark.parametrize("views", ["noise", "captions"])
def test_supcon_term_reaches_the_unet(digits_model, views):
    """A finite, non-zero gradient of the term in the UNet. About a minute on a shared
    2-core machine for the first view (compiles), seconds the next."""
    aux, params, branch, outputs, draws, _ = _supcon_case(digits_model, views)
    grad = jax.grad(lambda unet: aux.fn({**params, "unet": unet}, branch, outputs, draws))(
        params["unet"]
    )
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad))))
    assert np.isfinite(norm) and norm > 0


def test_a_multistyle_step_logs_the_supcon_term_and_keeps_the_encoder_frozen():
    config = _digits_config()
    config.train.supcon_projected = True
    trainer = train.setup(config, jax.devices()[:2])
    state = trainer.state
    assert style_contrast.IMAGE_ENCODER in state.frozen
    assert trainer.state.trainable["token_embedding"].shape[0] == 3
    encoder_before = jax.device_get(state.frozen[style_contrast.IMAGE_ENCODER])
    batch = trainer.batches.batch(0)
    assert set(batch["positive"]) == {"pixels", "input_ids", "label"}
    state, metrics = trainer.step_fn(state, trainer.batch(0))
    metrics = jax.device_get(metrics)
    for key in ("loss_supcon", "grad_norm_diffusion", "grad_norm_aux", "cosine_aux"):
        assert np.isfinite(metrics[key]), key
    assert 0 < metrics["loss_supcon"] and -1 <= metrics["cosine_aux"] <= 1
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(state.frozen[style_contrast.IMAGE_ENCODER]),
        encoder_before,
    )


# --- a short run of the launch script -----------------------------------------------------------


@pytest.mark.slow
def test_launch_train_runs_the_digits_form_and_resumes(tmp_path):
    """`launch/train.py` with configs/multistyle_digits.py: 4 steps, then 2 more resumed.
    About 4 minutes on a shared 2-core machine (two process starts, two compiles)."""
    workdir = str(tmp_path / "run")

    def launch(steps):
        cmd = [
            sys.executable, os.path.join(ROOT, "launch", "train.py"),
            "--config", os.path.join(ROOT, "configs", "multistyle_digits.py"),
            "--workdir", workdir,
            f"--config.train.num_steps={steps}", "--config.log.every=2",
            "--config.checkpoint.every=2", "--config.data.digits_count=8",
            "--config.train.supcon_views=captions",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(4)
    launch(6)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert row["loss_supcon"] > 0 and np.isfinite(row["cosine_aux"])
        assert row["grad_norm_aux"] > 0 and row["grad_norm_diffusion"] > 0


@pytest.mark.slow
def test_supcon_draws_leave_the_diffusion_draws_alone(digits_model):
    """Adding the SupCon term changes neither the diffusion loss nor its gradient.
    About 50 s on a shared 2-core machine (two gradient functions compiled)."""
    model, params = digits_model
    config = _digits_config()
    config.train.mode = "finetune"
    s, model, params = scope_lib.make_scope(
        config.train, model, params, style_tokens=runs.run_style_tokens(config)
    )
    settings = style_contrast.SupconSettings.from_config(config.train)
    encoder, encoder_params = style_contrast.load_encoder(settings, 0)
    params = {**params, style_contrast.IMAGE_ENCODER: encoder_params}
    trainable, frozen = s.split(params)
    state = step_lib.init_state(trainable, frozen, optax.sgd(1.0), jax.random.key(0))
    positives, index = sources.load_styled(config.data, 8)
    batches = pipeline.PairedBatches(
        positives, None, model.tokenize, config.train.prompt_template, "<s*>", 8, 0, False,
        styles=index,
    )  # fmt: skip
    batch = jax.tree.map(jnp.asarray, batches.batch(0))
    aux = style_contrast.make_auxiliary(settings, model, encoder)
    plain = step_lib.make_gradients(model, s, config.train)
    with_aux = step_lib.make_gradients(model, s, config.train, auxiliary=(aux,))
    g_plain, m_plain = jax.jit(plain)(state, batch, jax.random.key(5))
    g_aux, m_aux = jax.jit(with_aux)(state, batch, jax.random.key(5))
    np.testing.assert_allclose(m_aux["loss_pos"], m_plain["loss_pos"], rtol=1e-6)
    np.testing.assert_allclose(m_aux["grad_norm_diffusion"], optax.tree.norm(g_plain["positive"]),
                               rtol=1e-4)  # fmt: skip
    # Unprojected by default: the step's g+ is the diffusion gradient alone.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8),
        g_aux["positive"],
        g_plain["positive"],
    )
    np.testing.assert_allclose(
        optax.tree.norm(g_aux["unprojected"]), m_aux["grad_norm_aux"], rtol=1e-4
    )


@pytest.mark.slow
def test_supcon_encoder_script_writes_a_folder_training_loads(tmp_path):
    """benchmarks/supcon_encoder.py (micro) writes a tower that `train.supcon_encoder` loads."""
    out = tmp_path / "encoder"
    script = os.path.join(ROOT, "benchmarks", "supcon_encoder.py")
    command = [
        sys.executable,
        script,
        "--steps",
        "2",
        "--count",
        "10",
        "--batch",
        "16",
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    with open(out / "training.json") as f:
        record = json.load(f)
    config = _digits_config(count=2)
    config.train.supcon_encoder = str(out)
    settings = style_contrast.SupconSettings.from_config(config.train)
    encoder, params = style_contrast.load_encoder(settings, seed=0)
    assert encoder.config.image_size == 16

    # The accuracy it reports, recomputed with the tower it wrote: each held-out digit (50
    # per rendering, seed 1) goes to the nearest centroid of the training digits' (10 per
    # rendering, seed 0) unit embeddings.
    sys.path.insert(0, os.path.dirname(script))
    import supcon_encoder

    embed = jax.jit(lambda x: style_contrast.embed(encoder, params, x))
    train_pixels, train_labels = supcon_encoder.rendered(10, seed=0)
    test_pixels, test_labels = supcon_encoder.rendered(50, seed=1)
    train_embeddings = np.asarray(embed(train_pixels))
    centroids = np.stack([train_embeddings[train_labels == k].mean(0) for k in range(4)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    nearest = np.argmax(np.asarray(embed(test_pixels)) @ centroids.T, axis=1)
    assert record["trained_tower"]["accuracy_clean"] == np.mean(nearest == test_labels)


def test_run_summary_suggests_sampling_with_the_first_styles_token():
    import types

    config = _digits_config()
    log = types.SimpleNamespace(images_per_step=12, last={}, best={})
    text = train.run_summary(config, "/tmp/w", 0, 2, 1.0, log, config_file="c.py")
    assert f"in the style of {config.data.styles[0]['token']}'" in text
    assert config.train.style_token not in text
