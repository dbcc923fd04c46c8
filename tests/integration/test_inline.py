"""The Python API (``import neuroscan``): a scan of a list, a DataFrame or a file, and the
run's tables as every reader gets them, checked against a plain per-prompt forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import neuroscan
from neuroscan.config import Selection
from neuroscan.errors import UserError
from tests.conftest import CORPUS
from tests.reference import assert_scan_matches, reference_scan

ROWS = [{**row, "topic": f"t{i % 3}"} for i, row in enumerate(CORPUS)]
"""The shared corpus with an extra column of the user's."""


@pytest.fixture(scope="module")
def listed(ray_session, tmp_path_factory):
    """One scan of a list of dicts through ``neuroscan.scan``."""
    return neuroscan.scan(ROWS, out=tmp_path_factory.mktemp("inline") / "run", stages=2, quiet=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return reference_scan(tiny_model, [r["text"] for r in ROWS])


def test_a_list_scans_as_the_per_prompt_forward_pass_says(listed, reference):
    assert isinstance(listed, neuroscan.Run) and listed.manifest.status == "complete"
    checked = assert_scan_matches(listed.out, reference, Selection())
    assert checked == listed.manifest.totals.activation_rows > 0
    assert repr(listed).startswith(f"Run('{listed.out}': complete, {len(ROWS)} prompts, 28 layers")


def test_a_dataframe_a_list_and_a_file_are_the_same_corpus(tmp_path):
    """Polars and pandas frames of the rows and the rows themselves are written as one file
    (named by its content), which is the corpus ``neuroscan scan`` reads."""
    from cluster.inline import corpus_path

    paths = {corpus_path(ROWS), corpus_path(pd.DataFrame(ROWS)), corpus_path(pl.DataFrame(ROWS))}
    assert len(paths) == 1
    assert corpus_path([r["text"] for r in ROWS]) not in paths
    assert corpus_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(UserError, match="no prompts to submit"):
        corpus_path([])
    with pytest.raises(UserError, match=r"prompts .*nowhere does not exist: give a corpus file"):
        corpus_path(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"neuroscan.scan\(\) has no option 'hgih': use one of"):
        neuroscan.scan(ROWS, hgih=3.0)


@pytest.mark.parametrize("kind", ["pandas", "polars"])
def test_a_dataframe_scans_as_the_per_prompt_forward_pass_says(ray_session, reference, tmp_path, kind):
    frame = pd.DataFrame(ROWS) if kind == "pandas" else pl.DataFrame(ROWS)
    run = neuroscan.scan(frame, out=tmp_path / "frame", batch_tokens=512, quiet=True)
    assert assert_scan_matches(run.out, reference, Selection()) == run.manifest.totals.activation_rows > 0
    assert run.prompts(columns=["id", "topic"]).to_pylist()[1] == {"id": "days", "topic": "t1"}


def test_plain_strings_into_a_new_directory_and_a_corpus_file(ray_session, reference, tmp_path):
    """A list of strings with no ``out`` (a new directory under the temp dir), and a JSONL
    file by its path: the same rows as the forward pass."""
    import tempfile

    texts = neuroscan.scan([r["text"] for r in ROWS], quiet=True)
    assert texts.out.parent == Path(tempfile.gettempdir()) and texts.out.name.startswith("neuroscan-run-")
    assert assert_scan_matches(texts.out, reference, Selection()) == texts.manifest.totals.activation_rows
    assert texts.prompts(columns=["id"])["id"].to_pylist() == [str(i) for i in range(len(ROWS))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from_file = neuroscan.scan(path, out=tmp_path / "file", stages=3, quiet=True)
    assert assert_scan_matches(from_file.out, reference, Selection()) > 0
    assert from_file.manifest.corpus.source == str(path.resolve())


def test_activations_filter_and_join_as_asked(listed):
    everything = listed.activations()
    assert everything.num_rows == listed.manifest.totals.activation_rows
    assert everything.schema.field("layer").type == pa.int32()
    one = listed.activations(layer=5, prompts=["days", 0], neurons=range(0, 512, 2), to="pandas")
    mask = (
        (everything["layer"].to_numpy() == 5)
        & np.isin(everything["prompt_id"].to_numpy(), [0, 1])
        & (everything["neuron"].to_numpy() % 2 == 0)
    )
    assert len(one) == mask.sum() > 0 and set(one["prompt_id"]) <= {0, 1}
    joined = listed.activations(layer=[3, 27], with_prompts=True, to="polars")
    assert isinstance(joined, pl.DataFrame) and set(joined["layer"].unique()) == {3, 27}
    assert {"id", "family", "text", "topic", "n_tokens"} <= set(joined.columns) and "tokens" not in joined.columns
    topics = dict(zip(listed.prompts(to="pandas")["prompt_id"], listed.prompts(to="pandas")["topic"]))
    assert all(topics[p] == t for p, t in zip(joined["prompt_id"], joined["topic"]))
    assert listed.activations(layer=2, with_prompts=["family"]).column_names[-1] == "family"
    tokens = listed.activations(layer=np.int64(27), prompts=np.int64(1), with_prompts=["tokens", "topic"])
    assert set(tokens["prompt_id"].to_pylist()) == {1} and tokens["tokens"][0].as_py()[0] == "M"  # "Monday"
    with pytest.raises(UserError, match=r"prompt 'nope', 99 is not in .*: give prompt_ids or ids from run.prompts\(\)"):
        listed.activations(prompts=["days", "nope", 99])
    by_topic = listed.layers(layer=[26, 27], with_prompts=["topic"], to="pandas").groupby("topic").n_above_any.mean()
    assert list(by_topic.index) == ["t0", "t1", "t2"]
    layers = listed.layers(layer=27, to="pandas")
    assert len(layers) == len(ROWS) and (layers["n_above_any"] + layers["n_below_any"] >= layers["n_selected"]).all()
    assert set(listed.neurons(layer=4)["layer"].to_pylist()) == {4}
    with pytest.raises(UserError, match="to='excel' is not a table kind: use 'arrow', 'pandas' or 'polars'"):
        listed.layers(to="excel")


def test_band_codes_agree_with_the_counts(listed):
    """Every row's decoded codes: tokens above high (orange or red) = n_above, blue = n_below,
    and nothing past the prompt's own tokens."""
    rows = listed.activations(with_prompts=["n_tokens"])
    codes = listed.band_codes(rows)  # [rows, longest prompt]
    n_tokens = rows["n_tokens"].to_numpy()
    assert ((codes >= 0).sum(axis=1) == n_tokens).all()
    assert ((codes >= 2).sum(axis=1) == rows["n_above"].to_numpy()).all()
    assert ((codes == 1).sum(axis=1) == rows["n_below"].to_numpy()).all()
    assert (codes[np.arange(len(codes)), rows["max_pos"].to_numpy()] >= 0).all()
    same = neuroscan.decode_bands(rows["bands"], n_tokens)
    assert (same == codes).all() and set(np.unique(codes)) == {-1, 0, 1, 2, 3}  # the tiny model shows every band
    from neuroscan.bands import decode

    first = rows.slice(0, 1).to_pylist()[0]
    assert decode(first["bands"], first["n_tokens"]).tolist() == codes[0, : first["n_tokens"]].tolist()


def test_show_renders_the_strips_inline(listed):
    strips = listed.show("days", layer=27, top=5)
    page = strips._repr_html_()
    tokens = listed.prompts(to="pandas").set_index("id").loc["days", "tokens"]
    assert page.count("<div style=") == min(5, len(listed.activations(layer=27, prompts=["days"])))
    assert page.count("<span") == len(tokens) * page.count("<div style=")
    assert "layer 27" in repr(strips) and "neuron" in repr(strips)
    with pytest.raises(UserError, match="prompt 'nope' is not in"):
        listed.show("nope", layer=27)
    with pytest.raises(UserError, match="prompt 5000 is not in"):
        listed.show(5000, layer=27)


def test_open_reads_what_scan_returned(listed):
    again = neuroscan.open(listed.out)
    assert again.activations(layer=9).equals(listed.activations(layer=9))
