"""Shared fixtures: models built in code (never downloaded), a corpus, one local Ray per session."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
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
    from workers.embedded import preset_config, write_checkpoint

    config = preset_config("tiny", n_layer=5, n_embd=64, n_head=2, rotary_dim=8, n_inner=192, n_positions=512)
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


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs("512k")``: the directory of a real tmpfs of that size, mounted for the test and
    unmounted after it (the test is skipped where this process may not mount one)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def small_disk(tmpfs) -> Path:
    """A real tmpfs of 512 KiB (skipped where this process may not mount one); unmounted after."""
    return tmpfs("512k")


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the file system of ``disk`` with a file (``disk/ballast``, returned) until ``leave``
    bytes or fewer are free."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while (free := os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) > leave:
            os.write(fd, bytes(min(free - leave, 1 << 20)))
    except OSError:  # full: no byte is free
        pass
    finally:
        os.close(fd)
    return ballast


@pytest.fixture
def read_log(monkeypatch):
    """Record every tensor name read through safetensors (`workers.checkpoint`)."""
    names: list[str] = []
    from workers import checkpoint

    real_open = checkpoint.safe_open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):  # a header's shape and dtype, no bytes read
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            names.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: Spy(real_open(*a, **k)))
    return names
