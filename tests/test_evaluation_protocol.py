"""The img2txt2img protocol end to end: tiny SD generates from demo captions, CMMD compares."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
import sd_folders
from PIL import Image
from safetensors.numpy import save_file

from configs import demo
from nsync_jax import metrics
from nsync_jax import scope as scope_lib
from nsync_jax.evaluation import images, protocol


def _cheap_config(clip_dir):
    # The same sample settings in every test here: one compiled sampler, cache hits.
    config = demo.get_config()
    config.data.demo_count = 3
    config.sample.scheduler = "ddim"
    config.sample.num_steps = 2
    config.sample.batch_per_device = 1
    config.eval.metrics = ("cmmd",)
    config.eval.cmmd_weights = clip_dir
    return config


def test_evaluate_generates_one_image_per_caption_and_reports(tmp_path):
    config = _cheap_config(sd_folders.tiny_clip(tmp_path / "clip"))
    out = tmp_path / "eval"
    report = protocol.evaluate(config, str(out), "test")

    generated = images.list_images(str(out / "generated"))
    assert len(generated) == 3 and report["n_real"] == 3 and report["n_generated"] == 3
    prompts = [json.loads(line)["prompt"] for line in open(out / "generated" / "prompts.jsonl")]
    assert prompts[0] == "a red circle in the style of <s*>"
    assert np.isfinite(report["cmmd"]) and report["cmmd"] >= 0
    assert json.loads((out / "metrics.json").read_text()) == report

    # Comparing the generated folder with itself (no generation) gives CMMD 0.
    config.eval.generated_dir = config.eval.real_dir = str(out / "generated")
    again = protocol.evaluate(config, str(tmp_path / "again"), "test")
    assert again["cmmd"] == 0.0 and not (tmp_path / "again" / "generated").exists()


def test_run_evaluation_of_a_checkpoint_writes_eval_step_folder(tmp_path, tiny_sd, save_run):
    clip_dir = sd_folders.tiny_clip(tmp_path / "clip")
    config = _cheap_config(clip_dir)
    scope, _, params = scope_lib.make_scope(config.train, *tiny_sd)  # demo: the UNet trains.
    trainable, frozen = scope.split(params)
    workdir = str(tmp_path / "run")
    save_run(workdir, config, trainable, frozen)

    report = protocol.run_evaluation(config, "test", workdir=workdir)

    out = tmp_path / "run" / "eval" / "0"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == report and saved["step"] == 0 and saved["num_images"] == 3
    assert saved["model"]["kind"] == "run" and saved["model"]["workdir"] == workdir
    assert saved["sample"]["num_steps"] == 2 and saved["prompt_template"].startswith("{caption}")
    weight_file = os.path.join(clip_dir, "model.safetensors")
    expected = hashlib.sha256(open(weight_file, "rb").read()).hexdigest()
    assert saved["weights_sha256"] == {weight_file: expected}
    assert len(images.list_images(str(out / "generated"))) == 3
    assert (out / protocol.GRID_FILE).stat().st_size > 0
    rows = metrics.read_metrics(workdir)
    assert rows == [{"step": 0, "eval/cmmd": pytest.approx(report["cmmd"])}]
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    with pytest.raises(ValueError, match="--out"):
        protocol.run_evaluation(config, "test")  # The base model has no default folder.


def test_base_model_baseline_prompts_with_the_style_words(tmp_path):
    config = _cheap_config(sd_folders.tiny_clip(tmp_path / "clip"))
    out = tmp_path / "base"
    report = protocol.run_evaluation(config, "test", out_dir=str(out), style="Claude Monet")
    prompts = [json.loads(line)["prompt"] for line in open(out / "generated" / "prompts.jsonl")]
    assert prompts[0] == "a red circle in the style of Claude Monet"
    assert report["model"] == {"kind": "model", "model_source": "tiny"} and report["step"] is None
    assert (out / protocol.GRID_FILE).exists() and not (tmp_path / "metrics.jsonl").exists()


def test_load_textual_inversion_adds_the_exported_token(tmp_path, tiny_sd):
    model, params = tiny_sd
    width = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    row = np.full((1, width.shape[1]), 0.25, np.float32)
    path = str(tmp_path / "learned_embeds.safetensors")
    save_file({"<monet>": row}, path)

    model, params, token = protocol.load_textual_inversion(model, params, path)
    token_id = model.tokenizer.convert_tokens_to_ids("<monet>")
    table = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert token == "<monet>" and table.shape[0] == width.shape[0] + 1
    np.testing.assert_array_equal(table[token_id], row[0])
    assert token_id in model.tokenize(["a house in the style of <monet>"])[0]

    save_file({"<a>": row, "<b>": row}, path)
    with pytest.raises(ValueError, match="one token"):
        protocol.load_textual_inversion(*tiny_sd, path)


def test_load_model_of_a_textual_inversion_export(tmp_path, tiny_sd):
    from nsync_jax import export, torch_files

    config = demo.get_config()
    config.train.scope = "textual_inversion"
    scope, model, params = scope_lib.make_scope(config.train, *tiny_sd)
    trainable, frozen = scope.split(params)
    params = scope.merge(jax.tree.map(lambda x: x + 0.5, trainable), frozen)
    output = export.export_pipeline(model, params, str(tmp_path / "export"), scope=scope)

    config.model.source, config.model.pretrained = "pretrained", output
    under_test = protocol.load_model(config)
    assert under_test.style_token == "<s*>" and under_test.step is None
    assert under_test.source["learned_embeds"] == os.path.join(output, torch_files.EMBEDS_FILE)
    jax.tree.map(np.testing.assert_array_equal, under_test.params, params)
    prompt = ["a red circle in the style of <s*>"]
    np.testing.assert_array_equal(under_test.model.tokenize(prompt), model.tokenize(prompt))
    with pytest.raises(ValueError, match="--step needs --workdir"):
        protocol.load_model(config, step=3)


def test_evaluate_reads_a_lazy_folder_split(tmp_path):
    # Real images from a folder source are decoded on demand, never held as one array.
    data_dir = tmp_path / "paintings"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red circle", "a blue square", "a green star"]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(data_dir / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (data_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = _cheap_config(sd_folders.tiny_clip(tmp_path / "clip"))
    config.data.source, config.data.path = "folder", str(data_dir)
    examples = protocol.split_examples(config, "test")
    assert examples.reads == 0 and not hasattr(examples, "images")
    out = tmp_path / "eval"
    report = protocol.evaluate(config, str(out), "test")
    assert report["n_real"] == 3 and report["n_generated"] == 3
    assert np.isfinite(report["cmmd"]) and (out / protocol.GRID_FILE).stat().st_size > 0
