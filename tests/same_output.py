"""Two output directories hold the same tables (order aside) and consistent manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds

from neuroscan import schema
from prompts.generate import generate, write_jsonl


def sequence_corpus(path: Path, n: int, seed: int) -> Path:
    """Short numeric prompts (about 60 tokens): enough micro-batches and parts to interrupt."""
    write_jsonl(generate(n, families=["arithmetic", "countdown", "geometric"], variants=["zero_shot"], seed=seed), path)
    return path


def files(directory: Path) -> dict[Path, bytes]:
    """Every file under ``directory`` (relative path -> bytes): to show a command left it untouched."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tables(out: Path) -> dict:
    sort = {
        "activations": [("layer", "ascending"), ("prompt_id", "ascending"), ("neuron", "ascending")],
        "prompts": [("prompt_id", "ascending")],
        "layers": [("prompt_id", "ascending"), ("layer", "ascending")],
        "neurons": [("layer", "ascending"), ("neuron", "ascending")],
    }
    fmt = json.loads((out / "manifest.json").read_text())["format"]
    return {
        name: ds.dataset(out / name, format=fmt).to_table().sort_by(keys).replace_schema_metadata(None)
        for name, keys in sort.items()
    }


def assert_same_output(out: Path, reference: Path) -> None:
    got, want = tables(out), tables(reference)
    for name in want:
        assert got[name].num_rows == want[name].num_rows, name
        assert got[name].equals(want[name]), name
    m_got, m_want = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert m_got["status"] == "complete"
    assert m_got["totals"] == m_want["totals"] and m_got["summary"] == m_want["summary"]
    batches = [b for part in m_got["parts"] for b in part["batches"]]
    assert sorted(batches) == sorted(set(batches))  # no batch committed twice
    listed = {f["path"] for part in m_got["parts"] for f in part["files"]} | {m_got["neurons"]["path"]}
    listed |= {f["path"] for f in m_got["empty_layers"]}
    on_disk = {p.relative_to(out).as_posix() for t in schema.OUTPUT_DIRS for p in (out / t).rglob("*") if p.is_file()}
    assert on_disk == listed
