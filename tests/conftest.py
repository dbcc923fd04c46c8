"""Shared fixtures: models built in code (never downloaded), a corpus, one local Ray per session."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Without a GPU the fused Triton kernels run under Triton's interpreter, which must be switched
# on before anything imports triton (its language helpers are wrapped at import time).
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# The embedded model is cached per test session, never in the user's cache.
os.environ.setdefault("NEUROSCAN_CACHE", tempfile.mkdtemp(prefix="neuroscan-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    {"id": "short", "text": "Hi", "family": "misc"},
    {"id": "days", "text": "Monday, Tuesday, Wednesday,", "family": "days", "expected": " Thursday"},
    {"id": "unicode", "text": "Café naïve — ünïcödé ✓ 東京", "family": "misc"},
    {
        "text": "one two three four five six seven eight nine ten eleven twelve",
        "family": "numbers",
        "expected": " thirteen",
    },
    {"id": "long", "text": " ".join(f"word{i}" for i in range(60)), "family": "misc"},
    {
        "id": "colors",
        "text": 'Sequence: "red, green, blue" Pattern: Colors of the rainbow in order Next Word:',
        "family": "colors",
        "expected": ' "indigo"',
    },
    {"id": "x", "text": "x", "family": "misc"},
    {"id": "mid", "text": "The quick brown fox jumps over the lazy dog. " * 3, "family": "misc"},
    {"id": "digits", "text": "1, 3, 5, 7, 9, 11,", "family": "numbers", "expected": " 13"},
]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from workers.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    """A second tiny GPT-J of another shape, written in several shards with an index."""
    from workers.embedded import gptj_config, write_checkpoint

    config = gptj_config("tiny", n_layer=5, n_embd=64, n_head=2, rotary_dim=8, n_inner=192, n_positions=512)
    return write_checkpoint(config, tmp_path_factory.mktemp("other-model"), seed=7, shard_bytes=100_000)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CORPUS))
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with fake logical GPUs for placement tests."""
    import ray

    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray
    ray.shutdown()
