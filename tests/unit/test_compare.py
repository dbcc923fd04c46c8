"""compare on a constructed output directory: the separating neuron tops the list."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from neuroscan.errors import UserError
from neuroscan.manifest import Part, PartFile, write_manifest
from neuroscan.schema import ACTIVATIONS, PROMPTS
from results.compare import compare
from tests.manifests import header


@pytest.fixture
def run_dir(tmp_path):
    """20 'days' and 30 'months' prompts; neuron (3, 7) fires red on every days prompt only."""
    families = ["days"] * 20 + ["months"] * 30
    prompts = [
        {
            "prompt_id": i,
            "id": str(i),
            "family": f,
            "variant": "icl",
            "text": "t",
            "token_ids": [1],
            "tokens": ["t"],
            "n_tokens": 1,
            "expected": None,
            "top_tokens": [],
            "top_probs": [],
            "correct": None,
        }
        for i, f in enumerate(families)
    ]
    (tmp_path / "prompts").mkdir()
    pq.write_table(pa.Table.from_pylist(prompts, schema=PROMPTS), tmp_path / "prompts" / "part-00001.parquet")
    rng = np.random.default_rng(0)
    rows = {layer: [] for layer in (0, 3)}
    for pid, family in enumerate(families):
        for layer in (0, 3):
            for neuron in rng.choice(64, size=10, replace=False):
                if (layer, neuron) != (3, 7):
                    rows[layer].append((pid, int(neuron), float(rng.uniform(0, 5))))
        if family == "days":
            rows[3].append((pid, 7, 4.2))
    for layer, items in rows.items():
        table = pa.table(
            {
                "prompt_id": [r[0] for r in items],
                "neuron": [r[1] for r in items],
                "max_act": [r[2] for r in items],
                "max_pos": [0] * len(items),
                "min_act": [0.0] * len(items),
                "min_pos": [0] * len(items),
                "n_above": [1] * len(items),
                "n_below": [0] * len(items),
                "bands": [b"\x03"] * len(items),
            },
            schema=ACTIVATIONS,
        )
        (tmp_path / "activations" / f"layer={layer:02d}").mkdir(parents=True)
        pq.write_table(table, tmp_path / "activations" / f"layer={layer:02d}" / "part-00001.parquet")
    files = [
        PartFile(
            str(f.relative_to(tmp_path)),
            pq.read_metadata(f).num_rows,
            f.stat().st_size,
            hashlib.sha256(f.read_bytes()).hexdigest(),
        )
        for f in sorted(tmp_path.rglob("*.parquet"))
    ]
    write_manifest(tmp_path, header(partition=[[0, 4]], parts=[Part(1, [0], files)]))
    return tmp_path


def test_only_committed_parts_are_read(run_dir, tmp_path, capsys):
    """A killed scan leaves a part half-written, which its manifest does not list: compare reads
    what was committed, as the report does."""
    before = compare(run_dir, "family", "days", "months")
    (run_dir / "activations" / "layer=03" / "part-00002.parquet").write_bytes(b"PAR1 half a file")
    (run_dir / "prompts" / "part-00002.parquet").write_bytes(b"PAR1")
    assert compare(run_dir, "family", "days", "months").equals(before)
    (run_dir / "manifest.json").write_text('{"status": ')  # edited by hand, or a disk that lost it
    out = tmp_path / "cmp.parquet"
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"neuroscan: error: {run_dir / 'manifest.json'} is not valid JSON (Expecting value): something other than "
        "neuroscan wrote it (neuroscan replaces it whole); restore it, or scan again with --overwrite\n"
    )
    assert not out.exists()


def test_separating_neuron_tops_the_list(run_dir):
    table = compare(run_dir, "family", "days", "months")
    top = table.slice(0, 1).to_pylist()[0]
    assert (top["layer"], top["neuron"]) == (3, 7)
    assert top["a_frac"] == 1.0 and top["b_frac"] == 0.0 and top["diff"] == 1.0
    assert top["a_red_frac"] == 1.0 and top["red_diff"] == 1.0
    assert top["z"] == pytest.approx(np.sqrt(50), rel=1e-9)  # pooled p = 0.4: 1 / sqrt(0.24 * (1/20 + 1/30))
    diffs = np.abs(table["diff"].to_numpy())
    assert (diffs[:-1] >= diffs[1:]).all()
    swapped = compare(run_dir, "family", "months", "days").slice(0, 1).to_pylist()[0]
    assert (swapped["layer"], swapped["neuron"], swapped["diff"]) == (3, 7, -1.0)


def test_groups_default_and_errors(run_dir, tmp_path, capsys):
    assert compare(run_dir, "family").schema.metadata[b"a"] == b"days"  # exactly two groups
    with pytest.raises(
        UserError, match=r"this run has 1 variant value\(s\) \['icl'\], compare needs two: .*--variants icl,shuffled"
    ):
        compare(run_dir, "variant")
    assert compare(run_dir, "family", b="days").schema.metadata[b"a"] == b"months"  # the other of the two
    assert compare(run_dir, "family", a="months").schema.metadata[b"b"] == b"days"
    with pytest.raises(UserError, match=r"--b 'weeks' is not a family of this run: use one of \['days', 'months'\]"):
        compare(run_dir, "family", "days", "weeks")
    with pytest.raises(UserError, match="--a and --b are both 'days': name two different family values"):
        compare(run_dir, "family", "days", "days")
    out = tmp_path / "cmp.parquet"
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows > 1
    assert "A = days (20 prompts)" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope"), "--by", "family", "--out", str(out)]) == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    capsys.readouterr()
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(blocker / "c.parquet")]) == 2
    assert (
        capsys.readouterr().err
        == f"neuroscan: error: --out {blocker / 'c.parquet'}: cannot create {blocker} (File exists): choose a writable place\n"
    )


def test_a_reader_that_leaves_early_gets_no_traceback(run_dir, tmp_path):
    """`neuroscan compare ... | head -1`: head exits after one line and the pipe closes."""
    read, write = os.pipe()
    os.close(read)  # the reader already left
    out = tmp_path / "cmp.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "compare", str(run_dir), "--by", "family", "--out", str(out)],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    os.close(write)
    assert result.returncode == 141 and result.stderr == ""
    assert pq.read_table(out).num_rows > 1  # written before the summary was printed


def test_a_full_disk_while_compare_writes_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import errno
    import os

    import pyarrow as pa
    import pytest

    from neuroscan.errors import UserError
    from results import compare

    def full(table, out_dir, rel_stem, fmt):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compare, "write_table", full)
    out = tmp_path / "c.parquet"
    with pytest.raises(UserError, match=f"writing {out} failed \\(No space left on device\\): fix the disk"):
        compare.write_compare(pa.table({"x": [1]}), out)
    assert list(tmp_path.iterdir()) == []
