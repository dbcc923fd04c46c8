"""A GPT-J checkpoint checked against itself before anything starts.

``config.json`` and the tokenizer's JSON files must parse; the config's sizes must be positive
whole numbers that agree with each other (a head is ``n_embd / n_head`` wide, ``rotary_dim``
fits in a head); and every tensor a stage will read must be in the safetensors files with the
shape the config implies. Only the JSON files and the safetensors headers are read, never a
tensor's bytes, so this costs milliseconds for any model size. Each problem is one line that
names the file, the field or tensor, the values and the fix; before, such checkpoints failed
with a traceback from json, transformers or torch, some only once the stages were loading.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from neuroscan.errors import UserError

SIZES = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
"""Fields that must be positive whole numbers."""
MAX_POSITIONS = 1 << 20
"""A context longer than this is a typo: the rotary table alone would not fit in memory."""
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")
RESTORE = "the config and the weights are of different models: restore the checkpoint's config.json"


def check_consistent(path: Path, files: dict[str, str]) -> None:
    """``files``: tensor name -> safetensors file name (`workers.checkpoint.tensor_files`)."""
    config = _json_object(path / "config.json", "restore the checkpoint's config.json")
    if config.get("model_type") != "gptj":
        raise UserError(f"model at {path} is a {config.get('model_type')!r} model: neuroscan scans GPT-J models")
    for name in TOKENIZER_JSON:
        if (path / name).exists():
            _json_object(path / name, "save the tokenizer there again with tokenizer.save_pretrained")
    sizes = _sizes(path / "config.json", config)
    shapes = _shapes(path, files)
    expected = expected_shapes(**sizes)
    if config.get("tie_word_embeddings"):  # the head is the embedding: no tensor of its own
        expected.pop("lm_head.weight")
    for name, shape in expected.items():
        found = shapes.get(name)
        if found is None:
            raise UserError(
                f"{path} has no tensor {name}, which config.json (n_layer {sizes['n_layer']}) calls for: {RESTORE}"
            )
        if found[0] != shape:
            raise UserError(
                f"tensor {name} in {found[1]} is {list(found[0])}, but config.json's sizes make it {list(shape)} "
                f"(n_embd {sizes['n_embd']}, n_inner {sizes['n_inner']}, vocab_size {sizes['vocab_size']}): {RESTORE}"
            )
    blocks = {int(n.split(".")[2]) for n in shapes if n.startswith("transformer.h.")}
    if blocks and max(blocks) >= sizes["n_layer"]:
        raise UserError(
            f"the weights in {path} hold {max(blocks) + 1} blocks, but config.json says n_layer {sizes['n_layer']}: {RESTORE}"
        )


def expected_shapes(n_embd: int, n_inner: int, n_layer: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor a stage reads (biases and the other projections follow these)."""
    shapes = {
        "transformer.wte.weight": (vocab_size, n_embd),
        "transformer.ln_f.weight": (n_embd,),
        "lm_head.weight": (vocab_size, n_embd),
    }
    for i in range(n_layer):
        block = f"transformer.h.{i}"
        shapes |= {
            f"{block}.ln_1.weight": (n_embd,),
            f"{block}.attn.q_proj.weight": (n_embd, n_embd),
            f"{block}.attn.out_proj.weight": (n_embd, n_embd),
            f"{block}.mlp.fc_in.weight": (n_inner, n_embd),
            f"{block}.mlp.fc_out.weight": (n_embd, n_inner),
        }
    return shapes


def _sizes(file: Path, config: dict) -> dict[str, int]:
    """The sizes the shapes follow from, each checked on its own and against the others."""
    for key in SIZES:
        _positive(file, key, config.get(key))
    n_embd, n_head = config["n_embd"], config["n_head"]
    if n_embd % n_head:
        raise _bad(file, f"n_embd {n_embd} is not a multiple of n_head {n_head} (a head is n_embd / n_head wide)")
    if config["n_positions"] > MAX_POSITIONS:
        raise _bad(
            file,
            f"n_positions {config['n_positions']:,} is over {MAX_POSITIONS:,} (GPT-J's context is 2,048; "
            "the rotary table alone would not fit in memory)",
        )
    rotary = config.get("rotary_dim")
    if rotary is not None:
        _positive(file, "rotary_dim", rotary)
        if rotary > n_embd // n_head:
            raise _bad(file, f"rotary_dim {rotary} is wider than a head ({n_embd} / {n_head} = {n_embd // n_head})")
    n_inner = config.get("n_inner")
    if n_inner is not None:
        _positive(file, "n_inner", n_inner)
    return {
        "n_embd": n_embd,
        "n_inner": n_inner or 4 * n_embd,
        "n_layer": config["n_layer"],
        "vocab_size": config["vocab_size"],
    }


def _positive(file: Path, key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad(file, f"{key} is {value!r}, not a positive whole number")


def _bad(file: Path, problem: str) -> UserError:
    """A config.json problem, as the one line."""
    return UserError(f"{file}: {problem}: restore the checkpoint's config.json")


def _json_object(file: Path, fix: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({getattr(err, 'msg', None) or err.reason}): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is a JSON {type(data).__name__}, not an object: {fix}")
    return data


def _shapes(path: Path, files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's shape and file, from the safetensors headers."""
    shapes = {}
    for name in sorted(set(files.values())):
        try:
            with safe_open(str(path / name), framework="pt", device="cpu") as f:
                shapes |= {key: (tuple(f.get_slice(key).get_shape()), path / name) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"cannot read weights file {path / name} ({reason}): it is truncated or corrupted; write or download it again"
            ) from None
    return shapes
