"""results.run: a scan read through its manifest; a damaged or missing file is one line."""

from __future__ import annotations

import pytest

from cluster.cli import main
from neuroscan.errors import UserError
from neuroscan.manifest import read_manifest
from results.run import open_run
from tests.runs import finished_run
from tests.unit.test_manifest import _flip_a_byte


def test_a_missing_part_file_is_named_when_the_run_is_opened(tmp_path):
    out = finished_run(tmp_path / "run")
    gone = read_manifest(out).parts[1].files[0].path
    (out / gone).unlink()
    with pytest.raises(UserError, match=f"is damaged: {gone} is missing: restore the files from a copy"):
        open_run(out)


@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_name_a_file_whose_bytes_changed(tmp_path, capsys, command):
    """Same size, other bytes: the reader fails, and the failure is traced to the file."""
    out = finished_run(tmp_path / "run")
    manifest = read_manifest(out)
    damaged = next(f.path for f in manifest.files("prompts/"))
    _flip_a_byte(out / damaged)
    args = [str(out)] if command == "report" else [str(out), "--by", "family", "--out", str(tmp_path / "c.parquet")]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is damaged: {damaged} holds other bytes than were written" in err


def test_check_lists_every_damaged_file_and_exits_1(tmp_path, capsys):
    out = finished_run(tmp_path / "run")
    assert main(["check", str(out)]) == 0
    assert "match the manifest (size and sha256); a finished scan" in capsys.readouterr().out
    manifest = read_manifest(out)
    for f in (manifest.parts[0].files[0], manifest.neurons):
        _flip_a_byte(out / f.path)
    assert main(["check", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        f"{f.path} holds other bytes than were written (its sha256 differs)"
        for f in (manifest.parts[0].files[0], manifest.neurons)
    ]
    assert lines[2].startswith(f"{out}: 2 of ") and "do not match the manifest" in lines[2]
    assert main(["check", str(tmp_path)]) == 2  # not a scan: one line
    assert "has no manifest.json" in capsys.readouterr().err


def test_a_file_that_cannot_be_read_is_named_by_the_python_reader(tmp_path):
    """Opening checks sizes only; a file of the right size that Parquet cannot read is traced
    to the damaged file by its sha256 when it is read."""
    out = finished_run(tmp_path / "run")
    run = open_run(out)
    layers = run.manifest.files("layers/")[0].path
    data = bytearray((out / layers).read_bytes())
    data[-4:] = b"JUNK"  # Parquet's closing magic bytes
    (out / layers).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"is damaged: {layers} holds other bytes than were written"):
        run.read("layers")
    assert run.read("prompts").num_rows == 8  # the other tables read as before
