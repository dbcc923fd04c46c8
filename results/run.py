"""The read side of a scan: its output directory, read through its manifest.

Readers of a scan's tables (the report, ``compare``) go through `Run`, which reads only the
files the manifest lists: a killed scan's half-written part is never read, and a scan that
is still running can be read up to its last committed part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from neuroscan import schema
from neuroscan.errors import UserError
from neuroscan.manifest import NAME, Manifest, read_manifest


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
        return self.dataset(table, layer).to_table(columns=columns)

    def dataset(self, table: str, layer: int | None = None) -> ds.Dataset:
        files = self.files(table, layer)
        if not files:  # e.g. a layer where no neuron was ever kept
            return ds.dataset(schema.TABLES[table].empty_table())
        return ds.dataset(files, format=self.fmt)


def open_run(out_dir: str | Path) -> Run:
    """The scan in ``out_dir``, with at least one committed part; or one line saying what is missing."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out} has no {NAME}: give the output directory of a neuroscan scan")
    if not manifest.parts:
        raise UserError(
            f"{out} has no committed rows yet: wait for the scan to commit a part (or rerun it with --resume)"
        )
    return Run(out, manifest)
