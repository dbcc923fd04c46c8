"""The read side of a scan: its output directory, read through its manifest.

Readers of a scan's tables (the report, ``compare``) go through `Run`, which reads only the
files the manifest lists: a killed scan's half-written part is never read, and a scan that
is still running can be read up to its last committed part. When the run is opened every
listed file is checked against the size the manifest recorded (and, with ``verify``, against
its sha256: a flipped byte inside a Parquet page can read back as other values without any
error), and a file that cannot be read is looked for by its sha256: a damaged or missing
file is one line that names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from neuroscan import schema
from neuroscan.errors import UserError
from neuroscan.manifest import NAME, Manifest, damage_line, damaged_files, read_manifest


@dataclass
class Run:
    """A scan's output directory and its manifest."""

    out: Path
    manifest: Manifest

    @property
    def fmt(self) -> str:
        return self.manifest.format

    @property
    def n_layers(self) -> int:
        return self.manifest.n_layers

    def files(self, table: str, layer: int | None = None) -> list[str]:
        """Committed files of ``table`` (``activations`` of one ``layer`` when given)."""
        prefix = f"{table}/" if layer is None else f"{table}/layer={layer:02d}/"
        return [str(self.out / f.path) for f in self.manifest.files(prefix)]

    def read(self, table: str, columns: list[str] | None = None, layer: int | None = None) -> pa.Table:
        with self.reading():
            return self.dataset(table, layer).to_table(columns=columns)

    def batches(self, table: str, columns: list[str], layer: int | None = None) -> Iterator[pa.RecordBatch]:
        with self.reading():
            yield from self.dataset(table, layer).to_batches(columns=columns)

    def neurons(self) -> pa.Table:
        """``neurons/`` (written when the scan completes)."""
        with self.reading():
            return ds.dataset(str(self.out / self.manifest.neurons.path), format=self.fmt).to_table()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A file that cannot be read is looked for among the damaged ones, and named."""
        try:
            yield
        except (pa.ArrowException, OSError) as err:
            problems = damaged_files(self.out, self.manifest, hashes=True)
            if problems:
                raise UserError(damage_line(self.out, problems, FIX)) from None
            raise UserError(f"reading {self.out} failed ({str(err).splitlines()[0]}): {FIX}") from None

    def dataset(self, table: str, layer: int | None = None) -> ds.Dataset:
        files = self.files(table, layer)
        if not files:  # e.g. a layer where no neuron was ever kept
            return ds.dataset(schema.TABLES[table].empty_table())
        return ds.dataset(files, format=self.fmt)


def scan_manifest(out: Path) -> Manifest:
    """The manifest of the scan in ``out``, or one line saying it is not a scan's directory."""
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out} has no {NAME}: give the output directory of a neuroscan scan")
    return manifest


def open_run(out_dir: str | Path, verify: bool = False) -> Run:
    """The scan in ``out_dir``, with at least one committed part; or one line saying what is
    missing. ``verify``: read every listed file once to check its sha256 (what ``report`` and
    ``compare`` do before they read the tables)."""
    out = Path(out_dir)
    manifest = scan_manifest(out)
    if not manifest.parts:
        raise UserError(
            f"{out} has no committed rows yet: wait for the scan to commit a part (or rerun it with --resume)"
        )
    problems = damaged_files(out, manifest, hashes=verify)
    if problems:
        raise UserError(damage_line(out, problems, FIX))
    return Run(out, manifest)


FIX = "restore the files from a copy, or scan the corpus again into a new --out"
