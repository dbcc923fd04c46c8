"""``--resume --repair`` through the real command: a run with a damaged part (a flipped byte,
a deleted file, a part rewritten as valid Parquet with other values) or a damaged
``neurons/`` ends with the tables of the undamaged run, and checks clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from tests.same_output import assert_same_output, sequence_corpus
from tests.unit.test_manifest import _flip_a_byte

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--max-per-layer", "5", "--batch-tokens", "512", "--rows-per-part", "2000", "--quiet"]


def scan(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", "scan", str(corpus), "--out", str(out), *FLAGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return sequence_corpus(tmp_path_factory.mktemp("repair") / "prompts.jsonl", 80, seed=5)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = scan(corpus, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "manifest.json").read_text())["parts"]) >= 4
    return out


def _shift_neurons(path: Path) -> None:
    """The file rewritten as valid Parquet whose rows name the next neuron."""
    table = pq.read_table(path)
    neuron = table.schema.get_field_index("neuron")
    shifted = table.set_column(neuron, "neuron", pc.add(table["neuron"], 1).cast(table["neuron"].type))
    pq.write_table(shifted, path, compression="zstd")


DAMAGE = {  # which part (by index), which of its files, and what is done to it
    "flipped": (1, "activations/", _flip_a_byte),
    "deleted": (-1, "prompts/", Path.unlink),
    "rewritten": (0, "activations/", _shift_neurons),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_part_is_rescanned_to_the_undamaged_tables(corpus, reference, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    index, table, harm = DAMAGE[damage]
    part = json.loads((out / "manifest.json").read_text())["parts"][index]
    path = next(f["path"] for f in part["files"] if f["path"].startswith(table))
    harm(out / path)
    if damage == "rewritten":  # without --repair: refused, and the line says how to repair
        refused = scan(corpus, out, "--resume")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"is damaged: {path} " in refused.stderr and "--resume --repair" in refused.stderr
    repaired = scan(corpus, out, "--resume", "--repair")
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    n = len(part["batches"])
    first = repaired.stderr.splitlines()[0]
    assert first.startswith(f"--repair: dropped part {part['part']} ({path} ")
    assert first.endswith(f"rescanning its {n} micro-batch{'es' * (n > 1)}"), first
    assert_same_output(out, reference)
    assert main(["check", str(out)]) == 0


def test_a_damaged_neurons_file_is_written_again(corpus, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    _flip_a_byte(out / manifest["neurons"]["path"])
    repaired = scan(corpus, out, "--resume", "--repair")
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "no part dropped, writing neurons/ and the empty layers' files again" in repaired.stderr
    assert json.loads((out / "manifest.json").read_text())["parts"] == manifest["parts"]
    assert_same_output(out, reference)
    assert main(["check", str(out)]) == 0


def test_repair_without_resume_is_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["scan", str(corpus), "--out", str(out), "--repair"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroscan: error: --repair ") and err.count("\n") == 1, err
    assert "add --resume" in err and not out.exists()
