"""The PyTorch reference benchmark: a tiny CPU run, and the same projection as nsync_jax."""

import json
import math
import os
import sys

import diffusers  # noqa: F401  (the benchmark imports it; the test extra)
import jax
import numpy as np
import pytest
import torch

from nsync_jax import projection

# Benchmark-only code lives under benchmarks/, which the benchmark scripts import as
# sibling modules; the test reaches it the same way.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import throughput_torch

from nsync_jax import architectures as sd_arch

MODES = ("finetune", "nsync", "nsync_every4")


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on a shared two-core machine run the tiny UNet ~50x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_tiny_cpu_run_reports_every_mode(tmp_path):
    output = tmp_path / "throughput.json"
    returned = throughput_torch.main(
        [
            "--arch=tiny",
            "--resolution=64",
            "--batch=1",
            "--steps=2",
            "--warmup=1",
            "--device=cpu",
            f"--modes={','.join(MODES)}",
            "--peak_tflops=0.001",
            f"--output={output}",
        ]
    )
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(returned))
    assert sorted(saved["modes"]) == sorted(MODES)
    for mode, r in saved["modes"].items():
        for key in ("p50", "p90", "mean"):
            assert _finite(r["step_s"][key]) and r["step_s"][key] > 0, (mode, key)
        assert r["step_s"]["p50"] <= r["step_s"]["p90"]
        assert len(r["step_times_s"]) == 2
        for key in ("images_per_s", "flops_per_step_mean", "achieved_tflops", "mfu"):
            assert _finite(r[key]) and r[key] > 0, (mode, key)
        assert r["peak_memory_gib"] is None  # CUDA only.
        assert r["images_per_s"] == pytest.approx(r["images_per_step"] / r["step_s"]["mean"])

    finetune, nsync, every4 = (saved["modes"][m] for m in MODES)
    assert finetune["pairs_per_s"] is None
    assert _finite(nsync["pairs_per_s"]) and _finite(every4["pairs_per_s"])
    # Both branches are counted: nsync runs 2B images a step; the timed steps 1 and 2 of
    # nsync_every4 reuse the g- of step 0.
    assert (finetune["images_per_step"], nsync["images_per_step"]) == (1, 2)
    assert every4["images_per_step"] == 1
    assert nsync["pairs_per_s"] == pytest.approx(nsync["images_per_s"] / 2)
    # A fresh g- doubles the counted work (UNet and text encoder); a reused one costs none.
    one_branch = finetune["flops_per_step"]["step"]
    assert nsync["flops_per_step"] == {"fresh": 2 * one_branch}
    assert every4["flops_per_step"] == {"fresh": 2 * one_branch, "reused": one_branch}

    settings = saved["settings"]
    assert settings["unet_params"] == 792_964 and settings["latent_side"] == 8
    assert settings["unet_attention"] == ["AttnProcessor2_0"]
    for key in ("torch", "diffusers", "transformers", "python"):
        assert saved["versions"][key]


def test_negative_gradient_schedule():
    assert [throughput_torch.is_fresh("nsync_every4", i) for i in range(9)] == [
        True,
        False,
        False,
        False,
    ] * 2 + [True]
    assert all(throughput_torch.is_fresh("nsync", i) for i in range(5))
    assert not any(throughput_torch.is_fresh("finetune", i) for i in range(5))


def test_nsync_step_hands_adamw_the_projected_gradient():
    """After a fresh step the optimizer read g+ projected off g-: orthogonal to it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd_arch.unet_config("tiny"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**sd_arch.text_config("tiny")))
    text_encoder.requires_grad_(False)
    latents = {b: torch.randn(1, 4, 8, 8) for b in ("positive", "negative")}
    step = throughput_torch.TorchStep("nsync", unet, text_encoder, latents)
    # What AdamW will read, captured before its update: `params[i].grad`.
    seen = {}
    step.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.update(
            grads=torch.cat([p.grad.flatten() for p in opt.param_groups[0]["params"]])
        )
    )
    before = [p.detach().clone() for p in unet.parameters()]
    assert step(unet, fresh=True) == 2

    g_pos, g_neg = step.g_pos.flat, step.g_neg.flat
    assert torch.equal(seen["grads"], g_pos)
    assert g_neg.norm() > 0 and g_pos.norm() > 0
    assert abs(torch.dot(g_pos, g_neg)) < 1e-5 * g_pos.norm() * g_neg.norm()
    assert any(not torch.equal(a, p) for a, p in zip(before, unet.parameters(), strict=True))


def _random_tree(rng, scale=1.0):
    return {
        "conv": {"kernel": rng.standard_normal((3, 3, 4, 8)) * scale, "bias": rng.normal(size=8)},
        "dense": rng.standard_normal((16, 5)) * scale,
        "scalar": rng.standard_normal(()),
    }


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float32)


CASES = ("independent", "correlated", "anticorrelated", "parallel", "zero_negative")


@pytest.mark.parametrize("case", CASES)
def test_projection_matches_nsync_jax(case):
    rng = np.random.default_rng(CASES.index(case))
    pos = jax.tree.map(lambda x: np.asarray(x, np.float32), _random_tree(rng, scale=3.0))
    noise = jax.tree.map(lambda x: np.asarray(x, np.float32), _random_tree(rng))
    neg = {
        "independent": noise,
        "correlated": jax.tree.map(lambda p, n: 0.7 * p + n, pos, noise),
        "anticorrelated": jax.tree.map(lambda p, n: -0.5 * p + 0.2 * n, pos, noise),
        "parallel": jax.tree.map(lambda p: -2.5 * p, pos),
        "zero_negative": jax.tree.map(np.zeros_like, pos),
    }[case]

    u, _, coefficient = projection.project(pos, neg, rule="paper")
    expected = _flat(u)
    got_pos = torch.from_numpy(_flat(pos))
    got_coefficient = throughput_torch.project_paper_(got_pos, torch.from_numpy(_flat(neg)))

    scale = np.linalg.norm(_flat(pos))
    np.testing.assert_allclose(got_pos.numpy(), expected, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(float(got_coefficient), float(coefficient), rtol=1e-5, atol=1e-7)
    if case == "zero_negative":
        np.testing.assert_array_equal(got_pos.numpy(), _flat(pos))
    if case == "parallel":
        assert np.linalg.norm(got_pos.numpy()) < 1e-5 * scale


def test_projection_rejects_mismatched_buffers():
    with pytest.raises(ValueError, match="float32"):
        throughput_torch.project_paper_(torch.zeros(3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        throughput_torch.project_paper_(torch.zeros(3), torch.zeros(4))
