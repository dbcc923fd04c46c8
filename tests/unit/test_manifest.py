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
    assert data["model"] == {
        "id": "m",
        "path": "",
        "dtype": "float32",
        "revision": None,
        "fingerprint": None,
        "neurons": None,
        "architecture": None,
    }
    assert Manifest.from_dict(data) == HEADER


def test_a_fidelity_check_round_trips_and_an_older_run_has_none(tmp_path):
    from tests.manifests import header, verification

    checked = header(status="complete", verification=verification(off=40))
    write_manifest(tmp_path, checked)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert list(data["verification"]) == [f.name for f in dataclasses.fields(type(checked.verification))]
    assert list(data["verification"]["layers"]["1"]) == [
        "pairs",
        "kept_agreement",
        "selected",
        "selected_fp32",
        "flips",
        "max_diff",
        "min_diff",
        "off",
    ]
    assert read_manifest(tmp_path) == checked and not read_manifest(tmp_path).verification.passed
    del data["verification"]  # written before the check existed
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path).verification is None


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


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_files_names_each_missing_resized_or_altered_file(tmp_path):
    from neuroscan.manifest import damaged_files
    from tests.runs import finished_run

    out = finished_run(tmp_path / "run")
    manifest = read_manifest(out)
    assert len(manifest.parts) > 1 and damaged_files(out, manifest, hashes=True) == []
    altered, shortened, missing = (manifest.parts[i].files[0].path for i in (0, 1, -1))
    _flip_a_byte(out / altered)  # same size: only its sha256 tells
    (out / shortened).write_bytes((out / shortened).read_bytes()[:-7])
    (out / missing).unlink()
    written = {f.path: f.bytes for f in manifest.listed()}
    assert damaged_files(out, manifest) == [
        f"{shortened} is {written[shortened] - 7:,} bytes, not the {written[shortened]:,} written",
        f"{missing} is missing",
    ]
    assert damaged_files(out, manifest, hashes=True)[0] == (
        f"{altered} holds other bytes than were written (its sha256 differs)"
    )


def test_a_full_disk_while_the_manifest_is_replaced_keeps_the_old_one_in_one_line(tmp_path, monkeypatch):
    import errno
    import os

    write_manifest(tmp_path, HEADER)
    before = (tmp_path / "manifest.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    changed = dataclasses.replace(HEADER, status="complete")
    with pytest.raises(UserError, match="No space left on device.*the manifest before it is intact.*--resume"):
        write_manifest(tmp_path, changed)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no .manifest.json.tmp left


def test_the_blue_flood_is_said_with_the_flag_that_changes_it():
    from neuroscan.manifest import LayerSummary, ModelInfo, Summary, blue_flood_line
    from tests.manifests import header

    def run(blue: float, neurons: int | None = 100):
        layers = {"0": LayerSummary(99.0, 50.0, 2.0, blue), "1": LayerSummary(10.0, 10.0, 8.0, 2.0)}
        return header(model=ModelInfo(id="m", path="", dtype="float32", neurons=neurons), summary=Summary(layers))

    line = blue_flood_line(run(97.0))
    assert line.startswith("--low 0 selected up to 97% of the 100 neurons a prompt in 1 of 2 layers")
    assert "give a lower --low to select only strongly negative neurons (GELU's minimum is about -0.17" in line
    assert blue_flood_line(run(80.0)) is None
    assert blue_flood_line(run(97.0, neurons=None)) is None  # a run that did not record its width
    gated = header(
        model=ModelInfo(id="m", path="", dtype="float32", neurons=100, architecture="llama"),
        summary=Summary({"0": LayerSummary(99.0, 50.0, 2.0, 97.0), "1": LayerSummary(10.0, 10.0, 8.0, 2.0)}),
    )
    line = blue_flood_line(gated)
    assert "a gated MLP's activation, act(gate) * up, is negative wherever up is" in line and "GELU" not in line
