"""neuroscan.manifest: manifest.json read and written through its dataclasses."""

from __future__ import annotations

import dataclasses
import json

import pytest

from neuroscan.errors import UserError
from neuroscan.manifest import Manifest, read_manifest, write_manifest
from tests.manifests import HEADER


def test_manifest_replace_is_atomic_and_reads_back_as_written(tmp_path):
    write_manifest(tmp_path, HEADER)
    done = dataclasses.replace(HEADER, status="complete")
    write_manifest(tmp_path, done)
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert read_manifest(tmp_path) == done


def test_a_manifest_without_the_keys_a_run_adds_later_reads_with_their_defaults(tmp_path):
    """What the header holds is enough: parts, totals, summary... start empty (a manifest
    written before every key was always present reads the same way)."""
    data = HEADER.to_dict()
    for key in ("totals", "counters", "summary", "neurons", "empty_layers", "timings", "resumed_at", "skipped"):
        del data[key]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path) == HEADER


def test_the_json_keys_are_the_fields_and_round_trip(tmp_path):
    write_manifest(tmp_path, HEADER)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert list(data) == [f.name for f in dataclasses.fields(Manifest)]
    assert data["model"] == {"id": "m", "path": "", "dtype": "float32", "revision": None}
    assert Manifest.from_dict(data) == HEADER


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("model"),  # a key the run needs
        lambda d: d.update(parts=[{"part": 1, "batches": [0]}]),  # a part without its files
        lambda d: d.update(model="m"),  # a string where an object belongs
    ],
)
def test_a_manifest_that_is_not_neuroscans_is_one_line(tmp_path, edit):
    data = HEADER.to_dict()
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        UserError, match=r"manifest\.json is not a neuroscan manifest \(.*\): something other than neuroscan wrote it"
    ):
        read_manifest(tmp_path)
