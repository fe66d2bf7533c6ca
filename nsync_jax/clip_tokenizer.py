"""The CLIP tokenizer of a diffusers folder, from either layout transformers writes.

transformers 4 saves `vocab.json` and `merges.txt` (with `tokenizer_config.json` and
`special_tokens_map.json`); transformers 5 saves only `tokenizer.json` (the `tokenizers`
library's file) and `tokenizer_config.json`. Both load as the one class the code relies
on, transformers' slow `CLIPTokenizer` (`len`, `add_tokens` for textual inversion,
`save_pretrained` at export): a `tokenizer.json` is converted to `vocab.json` and
`merges.txt`, carrying over `model_max_length`, the special tokens (SD 2 pads with "!",
SD 1 with `<|endoftext|>`) and any tokens added past the BPE vocabulary.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from transformers import AddedToken, CLIPTokenizer

from nsync_jax import errors

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# CLIPTokenizer skips the first line of merges.txt, the BPE format's version header.
MERGES_HEADER = "#version: 0.2"


def load(directory: str) -> CLIPTokenizer:
    """The tokenizer in `directory` (a pipeline's `tokenizer/`), in either layout.

    Raises:
      errors.NotFound: neither vocab.json + merges.txt nor tokenizer.json is there.
      errors.ConfigError: a tokenizer.json that is not a BPE model like CLIP's.
    """
    if all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
        return CLIPTokenizer.from_pretrained(directory)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return from_tokenizer_json(directory)
    raise errors.NotFound(
        f"no tokenizer in {os.path.abspath(directory)}: looked for vocab.json + merges.txt "
        "(transformers 4) and tokenizer.json (transformers 5)"
    )


def _content(token: str | dict[str, Any]) -> str:
    # Special tokens are saved as strings or as AddedToken dicts.
    return token if isinstance(token, str) else token["content"]


def _settings(directory: str) -> dict[str, Any]:
    """`model_max_length` and the special tokens, as `from_pretrained` would read them.

    tokenizer_config.json first; special_tokens_map.json, where there is one, wins.
    """
    settings = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            config = json.load(f)
        if "model_max_length" in config:
            settings["model_max_length"] = config["model_max_length"]
        for key in SPECIAL_TOKENS:
            if config.get(key) is not None:
                settings[key] = _content(config[key])
    return settings


def from_tokenizer_json(directory: str) -> CLIPTokenizer:
    """A slow `CLIPTokenizer` equal to `directory/tokenizer.json` (transformers 5 layout)."""
    path = os.path.join(directory, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise errors.ConfigError(
            f"{path}: expected CLIP's BPE model (type BPE, end_of_word_suffix </w>), got "
            f"type={model.get('type')!r}, end_of_word_suffix={model.get('end_of_word_suffix')!r}"
        )
    vocab = model["vocab"]
    # `tokenizers` writes a merge as "a b" (before 0.20) or as ["a", "b"].
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with tempfile.TemporaryDirectory(prefix="nsync-tokenizer-") as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("\n".join([MERGES_HEADER, *merges]) + "\n")
        tokenizer = CLIPTokenizer(vocab_file, merges_file, **_settings(directory))
    added = sorted(
        (t for t in data.get("added_tokens", []) if t["content"] not in vocab),
        key=lambda t: t["id"],
    )
    for token in added:  # E.g. a textual-inversion placeholder.
        tokenizer.add_tokens([AddedToken(token["content"], special=token.get("special", False))])
        got = tokenizer.convert_tokens_to_ids(token["content"])
        if got != token["id"]:
            raise errors.ConfigError(
                f"{path}: added token {token['content']!r} has id {token['id']}, but follows "
                f"the vocabulary at id {got} (ids must be contiguous)"
            )
    return tokenizer
