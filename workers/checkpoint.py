"""Find a checkpoint on disk and read only the tensors a stage owns.

A checkpoint is a directory in Hugging Face layout: ``config.json``, ``model.safetensors``
or shards listed in ``model.safetensors.index.json``, and tokenizer files. safetensors
files are memory-mapped and read tensor by tensor, so a stage that owns blocks [a, b) never
touches the bytes of any other block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PretrainedConfig

from neuroscan.errors import UserError
from workers.consistency import check_consistent
from workers.families import family_of

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
DEMO, DEMO_DIR = "demo", Path(__file__).parent / "demo"
"""``--model demo``: the committed GPT-J trained on the in-context families (`workers.demo_model`)."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, as recorded in the manifest."""

    id: str
    """What the user asked for (a directory, a Hugging Face id or "demo"), or "embedded:tiny"."""
    path: str
    """The local directory actually loaded."""
    revision: str | None = None
    """The snapshot's commit hash when the model came from the Hugging Face cache."""


def resolve_model(model: str | None) -> ModelSource:
    """Map ``--model`` to a local checkpoint directory, checking it is complete."""
    if model is None:
        from workers.embedded import EMBEDDED_PRESET, embedded_model_dir

        return ModelSource(id=f"embedded:{EMBEDDED_PRESET}", path=str(embedded_model_dir()))
    path, revision = Path(model).expanduser(), None
    if model == DEMO and not path.exists():  # a directory named demo here wins, as a file named seed does
        check_checkpoint(DEMO_DIR)
        return ModelSource(id=DEMO, path=str(DEMO_DIR))
    if not path.exists():
        if model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise UserError(f"model directory {model} does not exist: pass a checkpoint directory or omit --model")
        path, revision = _from_hub_cache(model)
    check_checkpoint(path)
    return ModelSource(id=model, path=str(path.resolve()), revision=revision)


def _from_hub_cache(repo_id: str) -> tuple[Path, str | None]:
    """A Hugging Face id is looked up in the local cache only: neuroscan never downloads."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise UserError(
            f"model {repo_id} is neither a local directory nor in the Hugging Face cache: "
            f"download it first (`hf download {repo_id}`, from huggingface_hub) or pass its directory"
        ) from None
    return snapshot, snapshot.name


def check_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory: pass a checkpoint directory")
    if not (path / "config.json").exists():
        raise UserError(f"model directory {path} has no config.json: pass a Hugging Face checkpoint directory")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise UserError(
            f"model directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer there with tokenizer.save_pretrained"
        )
    files = tensor_files(path)
    if not files:
        convert = f"import transformers as t; t.AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype='auto').save_pretrained({str(path)!r})"
        raise UserError(
            f'model directory {path} has no safetensors weights: convert them once with python -c "{convert}"'
        )
    for name in sorted(set(files.values())):  # headers only: a truncated file fails here, before any actor starts
        if not (path / name).exists():
            raise UserError(f"weights file {path / name} listed in the index is missing: write or download it again")
        with _open(path / name):
            pass
    check_consistent(path, files)  # the config, the tokenizer's JSON and the tensors' shapes agree


FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 16, 1 << 16


def fingerprint(path: str | Path) -> str:
    """A digest of the checkpoint's weights that ``--resume`` compares, cheap for any size:
    ``config.json`` whole, and per weight file its name, size, safetensors header (every
    tensor's name, dtype, shape and offsets) and 16 samples of 64 KiB spread evenly over its
    bytes (about 1 MB read per file). New weights of the same shapes (another training step, a
    fine-tune, another seed) change nearly every sample; what it cannot see is a change that
    leaves the size, the header and all 16 samples as they were (a few values edited by hand)."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for name in sorted(set(tensor_files(path).values())):
        file = path / name
        size = file.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header, size)))
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(i * max(0, size - FINGERPRINT_SAMPLE_BYTES) // max(1, FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def load_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config, as its family's config class (`workers.families`); one line
    for a model_type neuroscan does not scan."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    return family_of(model_type, path).module("config").from_pretrained(path)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)


def tensor_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single file's header."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = path / "model.safetensors"
    if not single.exists():
        return {}
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single.name)


def read_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read exactly ``names`` (each from its own file), on the CPU."""
    path = Path(path)
    tensors = {}
    for file, keys in _by_file(path, names).items():
        try:
            with _open(path / file) as f:
                for key in keys:
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise _corrupt(path / file, err) from None
    return tensors


def read_slices(path: str | Path, cuts: dict[str, tuple[slice, ...]]) -> dict[str, torch.Tensor]:
    """Read the part ``cuts[name]`` (a slice a dimension) of each tensor, on the CPU: only
    those bytes are read from the file."""
    path = Path(path)
    tensors = {}
    for file, keys in _by_file(path, list(cuts)).items():
        try:
            with _open(path / file) as f:
                for key in keys:
                    tensors[key] = f.get_slice(key)[cuts[key]]
        except (SafetensorError, OSError) as err:
            raise _corrupt(path / file, err) from None
    return tensors


def tensor_headers(path: str | Path, names: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each of ``names``' shape and safetensors dtype ("F32", "BF16"...), from the files'
    headers alone: no tensor's bytes are read."""
    path = Path(path)
    headers = {}
    for file, keys in _by_file(path, names).items():
        try:
            with _open(path / file) as f:
                for key in keys:
                    piece = f.get_slice(key)
                    headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as err:
            raise _corrupt(path / file, err) from None
    return headers


def _by_file(path: Path, names: list[str]) -> dict[str, list[str]]:
    """``names`` grouped by the safetensors file that holds each; one line if any is missing."""
    where = tensor_files(path)
    missing = [n for n in names if n not in where]
    if missing:
        raise UserError(f"checkpoint {path} lacks tensors {missing[:3]}: it is not a complete checkpoint")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    return by_file


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise _corrupt(file, err) from None


def _corrupt(file: Path, err: Exception) -> UserError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(
        f"cannot read weights file {file} ({reason}): it is truncated or corrupted; write or download it again"
    )
