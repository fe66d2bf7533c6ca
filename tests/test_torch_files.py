"""The learned-embeddings files every exporter writes through one writer."""

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from nsync_jax import torch_files


def test_learned_embeds_are_float32_and_named_in_the_info_file(tmp_path):
    row = jnp.arange(8, dtype=jnp.bfloat16).reshape(1, 8)
    path = torch_files.save_learned_embeds(str(tmp_path / "out"), "<s*>", row)
    assert path == str(tmp_path / "out" / torch_files.EMBEDS_FILE)
    embeds = load_file(path)
    assert list(embeds) == ["<s*>"] and embeds["<s*>"].dtype == np.float32
    np.testing.assert_array_equal(embeds["<s*>"], np.arange(8, dtype=np.float32)[None])
    with open(tmp_path / "out" / torch_files.EMBEDS_INFO_FILE) as f:
        info = json.load(f)
    assert info == {"placeholder_token": "<s*>", "weight_name": torch_files.EMBEDS_FILE}
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [torch_files.EMBEDS_FILE, torch_files.EMBEDS_INFO_FILE]
    )
