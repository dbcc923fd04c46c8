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


def _as_schema_one(out) -> None:
    """Rewrite a finished run as schema 1 wrote it: ``layer`` only in ``activations/layer=NN/``."""
    import dataclasses

    import pyarrow.parquet as pq

    from neuroscan.manifest import PartFile, file_sha256, write_manifest

    manifest = read_manifest(out)

    def moved(f: PartFile) -> PartFile:
        if not f.path.startswith("activations/"):
            return f
        layer = int(f.path.split("/")[1].removeprefix("layer_"))
        path = f"activations/layer={layer:02d}/{f.path.rsplit('/', 1)[1]}"
        (out / path).parent.mkdir(exist_ok=True)
        pq.write_table(pq.read_table(out / f.path).drop_columns(["layer", "up_at_max", "up_at_min"]), out / path)
        (out / f.path).unlink()
        return PartFile(path, f.rows, (out / path).stat().st_size, file_sha256(out / path))

    for part in manifest.parts:
        part.files = [moved(f) for f in part.files]
    manifest.empty_layers = [moved(f) for f in manifest.empty_layers]
    for emptied in (out / "activations").glob("layer_*"):
        emptied.rmdir()
    write_manifest(out, dataclasses.replace(manifest, schema_version=1))


def test_a_schema_one_run_reads_as_schema_two(tmp_path):
    """Runs written before ``layer`` was stored in the files read the same through neuroscan:
    the same columns in the same order, ``layer`` an int32 from the directory."""
    new = open_run(finished_run(tmp_path / "new"))
    old_dir = finished_run(tmp_path / "old")
    _as_schema_one(old_dir)
    assert not list((old_dir / "activations").glob("layer_*"))
    old = open_run(old_dir, verify=True)
    by = [("prompt_id", "ascending"), ("layer", "ascending"), ("neuron", "ascending")]
    assert old.read("activations").sort_by(by).equals(new.read("activations").sort_by(by))
    assert old.read("activations", layer=2).equals(new.read("activations", layer=2))
    assert main(["report", str(old_dir)]) == 0


def test_a_schema_two_run_reads_with_null_gated_columns(tmp_path):
    """Runs written before the gated MLP's columns read the same, those columns null."""
    import dataclasses

    import pyarrow.parquet as pq

    from neuroscan.manifest import PartFile, file_sha256, write_manifest

    new = open_run(finished_run(tmp_path / "new"))
    out = finished_run(tmp_path / "old")
    manifest = read_manifest(out)

    def dropped(f: PartFile) -> PartFile:
        if f.path.startswith("activations/"):
            pq.write_table(pq.read_table(out / f.path).drop_columns(["up_at_max", "up_at_min"]), out / f.path)
            return PartFile(f.path, f.rows, (out / f.path).stat().st_size, file_sha256(out / f.path))
        return f

    for part in manifest.parts:
        part.files = [dropped(f) for f in part.files]
    manifest.empty_layers = [dropped(f) for f in manifest.empty_layers]
    write_manifest(out, dataclasses.replace(manifest, schema_version=2))
    old = open_run(out, verify=True)
    by = [("prompt_id", "ascending"), ("layer", "ascending"), ("neuron", "ascending")]
    table = old.read("activations").sort_by(by)
    assert table.equals(new.read("activations").sort_by(by)) and table["up_at_max"].null_count == len(table) > 0
    assert old.activations(layer=1).num_rows == new.activations(layer=1).num_rows
    assert main(["report", str(out)]) == 0


def test_resume_refuses_a_run_of_another_schema(tmp_path):
    from cluster.output import prepare_output
    from tests.manifests import HEADER

    out = finished_run(tmp_path / "old")
    _as_schema_one(out)
    with pytest.raises(UserError, match="cannot resume .* holds output schema 1 and this neuroscan writes schema 3"):
        prepare_output(out, overwrite=False, resume=True, header=HEADER)
