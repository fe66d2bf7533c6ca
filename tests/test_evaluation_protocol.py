"""The img2txt2img protocol end to end: tiny SD generates from demo captions, CMMD compares."""

import json

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from configs import demo
from nsync_jax.evaluation import images, protocol


def test_evaluate_generates_one_image_per_caption_and_reports(tmp_path):
    torch.manual_seed(0)
    clip_dir = tmp_path / "clip"
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=8,
        )
    ).save_pretrained(clip_dir)
    config = demo.get_config()
    config.data.demo_count = 3
    config.sample.scheduler = "ddim"
    config.sample.num_steps = 2
    config.sample.batch_per_device = 1
    config.eval.metrics = ("cmmd",)
    config.eval.cmmd_weights = str(clip_dir)
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
