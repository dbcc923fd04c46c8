"""A checkpoint checked against itself before anything starts.

``config.json`` and the tokenizer's JSON files must parse; its ``model_type`` must be a family
neuroscan scans (`workers.families`); the config's sizes must be positive whole numbers that
agree with each other (a head is ``n_embd / n_head`` wide, GPT-J's ``rotary_dim`` fits in a
head, key-value heads divide the heads); the weights must hold the config's number of blocks;
and every tensor a stage will read must be in the safetensors files with the shape the
family's own modules, built from the config on the meta device, give it. Only the JSON files
and the safetensors headers are read, never a tensor's bytes, so this costs well under a
second for any model size. Each problem is one line that
names the file, the field or tensor, the values and the fix; before, such checkpoints failed
with a traceback from json, transformers or torch, some only once the stages were loading.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from neuroscan.errors import UserError
from workers.families import Family, family_of, tensor_shapes

MAX_POSITIONS = 1 << 20
"""A context longer than this is a typo: the rotary table alone would not fit in memory."""
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")
RESTORE = "the config and the weights are of different models: restore the checkpoint's config.json"


def check_consistent(path: Path, files: dict[str, str]) -> None:
    """``files``: tensor name -> safetensors file name (`workers.checkpoint.tensor_files`)."""
    config = _json_object(path / "config.json", "restore the checkpoint's config.json")
    fam = family_of(config.get("model_type"), path)
    for name in TOKENIZER_JSON:
        if (path / name).exists():
            _json_object(path / name, "save the tokenizer there again with tokenizer.save_pretrained")
    _check_sizes(path / "config.json", config, fam)
    shapes = _shapes(path, files)
    prefix, head = fam.stored_names(shapes)
    layers_key = fam.sizes[2]
    n_layers = config[layers_key]
    block = f"{prefix}{fam.blocks}."
    blocks = {int(n.removeprefix(block).split(".")[0]) for n in shapes if n.startswith(block)}
    held = max(blocks) + 1 if blocks else 0
    if held > n_layers:
        raise UserError(
            f"the weights in {path} hold {held} blocks, but config.json says {layers_key} {n_layers}: {RESTORE}"
        )
    if held < n_layers:
        raise UserError(
            f"{path} has no tensors of block {held} ({block}{held}.*), which config.json ({layers_key} {n_layers}) "
            f"calls for: {RESTORE}"
        )
    embed = f"{prefix}{fam.embed}.weight"  # before building anything from sizes that may be absurd
    d_key, vocab_key = fam.sizes[0], fam.sizes[4]
    if embed in shapes and shapes[embed][0] != (config[vocab_key], config[d_key]):
        raise UserError(
            f"tensor {embed} in {shapes[embed][1]} is {list(shapes[embed][0])}, but config.json's sizes make it "
            f"{[config[vocab_key], config[d_key]]} ({vocab_key} {config[vocab_key]}, {d_key} {config[d_key]}): {RESTORE}"
        )
    for name, shape in expected_shapes(path, fam, prefix, head, tied=f"{head}.weight" not in shapes).items():
        found = shapes.get(name)
        if found is None:
            raise UserError(f"{path} has no tensor {name}, which config.json calls for: {RESTORE}")
        if found[0] != shape:
            sizes = ", ".join(f"{key} {config[key]}" for key in fam.sizes if key in config)
            raise UserError(
                f"tensor {name} in {found[1]} is {list(found[0])}, but config.json's sizes make it {list(shape)} "
                f"({sizes}): {RESTORE}"
            )


def expected_shapes(path: Path, fam: Family, prefix: str, head: str, tied: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a stage reads, as the family's own modules built from
    ``config.json`` hold them (`workers.families.tensor_shapes`); the head is left out where
    it is tied to the embedding and not stored."""
    try:
        config = fam.module("config").from_pretrained(path)
        return tensor_shapes(config, prefix, not (tied and getattr(config, "tie_word_embeddings", False)), head)
    except (ValueError, TypeError, AttributeError, RuntimeError, ZeroDivisionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _bad(path / "config.json", f"transformers cannot build a {fam.name} model from it ({reason})") from None


def _check_sizes(file: Path, config: dict, fam: Family) -> None:
    """The sizes the shapes follow from, each checked on its own and against the others."""
    for i, key in enumerate(fam.sizes):
        if i < 5 or key in config:  # past the first five, a field left out takes transformers' default
            _positive(file, key, config.get(key))
    d_key, heads_key, _, context_key, _ = fam.sizes[:5]
    d, heads = config[d_key], config[heads_key]
    if d % heads:
        raise _bad(file, f"{d_key} {d} is not a multiple of {heads_key} {heads} (a head is {d_key} / {heads_key} wide)")
    if config[context_key] > MAX_POSITIONS:
        raise _bad(
            file,
            f"{context_key} {config[context_key]:,} is over {MAX_POSITIONS:,} "
            "(the rotary or position table alone would not fit in memory)",
        )
    rotary = config.get("rotary_dim")
    if fam.model_type == "gptj" and rotary is not None:
        _positive(file, "rotary_dim", rotary)
        if rotary > d // heads:
            raise _bad(file, f"rotary_dim {rotary} is wider than a head ({d} / {heads} = {d // heads})")
    kv = config.get("num_key_value_heads")
    if fam.up is not None and kv is not None:
        _positive(file, "num_key_value_heads", kv)
        if heads % kv:
            raise _bad(file, f"{heads_key} {heads} is not a multiple of num_key_value_heads {kv}")
    inner = config.get("n_inner")
    if inner is not None:
        _positive(file, "n_inner", inner)


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
