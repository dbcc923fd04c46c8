"""The report's pure readers (no browser): the family shares a neuron page shows; the report
of a scan that did not finish (killed, or still running), built from its committed parts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from aggregator.aggregator import Aggregator
from aggregator.neurons import layer_delta, neurons_table
from cluster.cli import main
from neuroscan.manifest import Corpus
from report import data
from report.data import family_frequency
from results.run import open_run
from tests.manifests import header
from tests.runs import finished_run, random_micro_batch


def test_family_frequency_is_the_share_of_each_familys_prompts_that_kept_the_neuron():
    rng = np.random.default_rng(3)
    ids = np.arange(0, 200, 2)  # sorted prompt ids, not 0..n-1
    family = np.array(rng.choice(["days", "colors", "(none)", "letters"], len(ids)))
    size = dict(Counter(family.tolist()))
    pick = rng.integers(0, len(ids), 300)
    rows = pa.table({"prompt_id": ids[pick], "neuron": rng.integers(0, 6, 300).astype(np.int32)})
    rows = pa.Table.from_pylist(
        list({(r["prompt_id"], r["neuron"]): r for r in rows.to_pylist()}.values())
    )  # one row a (prompt, neuron)
    expected: dict[int, Counter] = {}
    for r in rows.to_pylist():
        expected.setdefault(r["neuron"], Counter())[family[np.searchsorted(ids, r["prompt_id"])]] += 1
    got = family_frequency(rows, ids, family, size)
    assert set(got) == set(expected)
    for neuron, counts in expected.items():
        assert list(got[neuron]) == sorted(counts)  # families in name order
        assert got[neuron] == pytest.approx({f: c / size[f] for f, c in counts.items()})


def _micro_batch(batch_id: int, rng: np.random.Generator, size: int = 3, rows: int = 6, tokens: int = 8):
    """One micro-batch of ``size`` prompts over two layers, ``rows`` kept neurons a (prompt, layer)."""
    neurons = np.concatenate([np.sort(rng.choice(40, rows, replace=False)) for _ in range(2 * size)])
    return random_micro_batch(batch_id, rng, size, 2, neurons, tokens, families=2)


@pytest.fixture
def killed(tmp_path) -> Path:
    """A scan of 15 prompts killed after committing 3 parts (9 prompts): a 4th micro-batch was
    received but never committed, a 5th never came."""
    head = header(stages=1, partition=[[0, 2]], top_k=4, corpus=Corpus(source="seed", sha256=None, prompts=15))
    rng = np.random.default_rng(0)
    (tmp_path / "run").mkdir()
    agg = Aggregator(str(tmp_path / "run"), head, [chr(i) for i in range(256)], rows_per_part=1)
    for b in range(3):
        agg.add(*_micro_batch(b, rng))  # a part each
    agg.wait()
    agg.rows_per_part = 10**9
    agg.add(*_micro_batch(3, rng))  # buffered when the scan was killed
    agg.close()
    return tmp_path / "run"


def test_a_killed_scan_reads_as_its_committed_parts(killed):
    run = open_run(killed)
    assert run.manifest.status == "running" and len(run.manifest.parts) == 3
    assert sorted(run.read("prompts")["prompt_id"].to_pylist()) == list(range(9))
    neurons = run.neurons()
    deltas = run.manifest.files("neuron_parts/")
    assert len(deltas) == 3
    assert neurons.equals(neurons_table(killed, deltas, run.fmt, k=4))  # the merge of the committed deltas
    for layer in (0, 1):  # ... which is the table of the committed rows, in one pass
        rows = run.read("activations", layer=layer)
        assert neurons.filter(pc.equal(neurons["layer"], layer)).equals(layer_delta(layer, rows, 4, red=3.5))
    assert run.neurons(layer=1).equals(neurons.filter(pc.equal(neurons["layer"], 1)))
    assert data.top_neurons(run, 3).num_rows == 6


def test_the_report_of_a_killed_scan_is_marked_partial(killed, capsys):
    line = "partial: 9 of 15 prompts committed; the scan was interrupted or is still running"
    assert main(["report", str(killed)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {killed / 'report'}/ (open ") and out.rstrip().endswith(f"; {line}")
    site = killed / "report"
    index = (site / "index.html").read_text()
    assert "<h1>neuroscan report (partial)</h1>" in index
    assert f'<p class="notice" id="partial">{line}. This report shows what it committed;' in index
    assert "<th>time</th><td>not finished</td>" in index
    shown = json.loads((site / "data" / "prompt-index.js").read_text().split("] = ", 1)[1].rstrip(";\n"))
    assert [row[0] for row in shown] == list(range(9))  # the committed prompts, not the buffered ones
    listed = data.top_neurons(open_run(killed), 20).to_pylist()  # from the merge of the committed deltas
    pages = sorted(p.name for p in (site / "neurons").glob("*.html"))
    assert pages == sorted(f"{r['layer']:02d}-{r['neuron']:05d}.html" for r in listed) and len(pages) == 40
    for row in listed:  # each page shows the neuron's merged top prompts
        page = (site / "neurons" / f"{row['layer']:02d}-{row['neuron']:05d}.html").read_text()
        payload = json.loads(page.split("window.NEURON = ", 1)[1].split(";</script>", 1)[0])
        assert [t["prompt_id"] for t in payload["top"]] == row["top_prompt_ids"]
        assert payload["n_prompts"] == row["n_prompts"]


def test_a_finished_scan_is_not_marked_and_a_scan_without_a_part_is_refused(tmp_path, capsys):
    done = finished_run(tmp_path / "done")
    assert main(["report", str(done)]) == 0
    assert "partial" not in capsys.readouterr().out
    assert 'id="partial"' not in (done / "report" / "index.html").read_text()
    (tmp_path / "empty").mkdir()
    Aggregator(str(tmp_path / "empty"), header(), [chr(i) for i in range(256)], rows_per_part=1).close()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no committed rows yet" in err
    assert not (tmp_path / "empty" / "report").exists()


def test_the_report_says_when_the_blue_rule_selected_nearly_every_neuron(tmp_path):
    """The summary's blue means against the model's width: the index page carries the line
    (with the flag that changes it) only when the blue rule flooded a layer."""
    import dataclasses

    from neuroscan.manifest import read_manifest, write_manifest

    out = finished_run(tmp_path / "run")
    assert main(["report", str(out)]) == 0
    assert 'id="blue-flood"' not in (out / "report" / "index.html").read_text()
    manifest = read_manifest(out)
    blue = next(iter(manifest.summary.layers.values())).mean_blue
    assert blue is not None
    model = dataclasses.replace(manifest.model, neurons=max(1, int(blue / 0.95)))
    write_manifest(out, dataclasses.replace(manifest, model=model))
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert 'id="blue-flood"' in page and "give a lower --low to select only strongly negative neurons" in page
