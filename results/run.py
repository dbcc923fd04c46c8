"""The read side of a scan: its output directory, read through its manifest.

Readers of a scan's tables (the report, ``compare``) go through `Run`, which reads only the
files the manifest lists: a killed scan's half-written part is never read, and a scan that
is still running can be read up to its last committed part. When the run is opened every
listed file is checked against the size the manifest recorded (and, with ``verify``, against
its sha256: a flipped byte inside a Parquet page can read back as other values without any
error), and a file that cannot be read is looked for by its sha256: a damaged or missing
file is one line that names it.

Runs of schema 1 (``layer`` only in ``activations/layer=NN/`` directory names) read the same:
their ``layer`` is taken from the directory, as int32, in the column order of schema 2.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from aggregator.neurons import neurons_table
from neuroscan import bands, schema
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

    def files(self, table: str, layer=None) -> list[str]:
        """Committed files of ``table`` (``activations`` of one ``layer``, or a list of them, when given)."""
        if layer is None:
            return [str(self.out / f.path) for f in self.manifest.files(f"{table}/")]
        prefixes = [f"{schema.layer_dir(one, self.manifest.schema_version)}/" for one in _listed(layer)]
        return [str(self.out / f.path) for prefix in prefixes for f in self.manifest.files(prefix)]

    def read(self, table: str, columns: list[str] | None = None, layer: int | None = None) -> pa.Table:
        with self.reading():
            return self.dataset(table, layer).to_table(columns=self._columns(table, columns))

    def batches(self, table: str, columns: list[str], layer: int | None = None) -> Iterator[pa.RecordBatch]:
        with self.reading():
            yield from self.dataset(table, layer).to_batches(columns=columns)

    def _columns(self, table: str, columns: list[str] | None) -> list[str] | None:
        """Older runs' activations in this schema's column order (schema 1 had ``layer`` last;
        both 1 and 2 lack the gated MLP's columns, read as null)."""
        if columns is None and table == "activations" and self.manifest.schema_version < 3:
            return schema.ACTIVATIONS.names
        return columns

    def neurons(self, layer: int | None = None, to: str = "arrow"):
        """``neurons/``: each neuron's max-activating prompts. ``neurons/`` is written when the
        scan completes; before that (a scan still running, or killed) the table is the merge of
        the committed parts' deltas (``neuron_parts/``): the neurons of what is committed."""
        with self.reading():
            if self.manifest.neurons is None:
                deltas = self.manifest.files("neuron_parts/")
                merged = neurons_table(self.out, deltas, self.fmt, self.manifest.top_k)
                return frame(merged.filter(_matches("layer", layer)), to)
            table = ds.dataset(str(self.out / self.manifest.neurons.path), format=self.fmt).to_table(
                filter=_matches("layer", layer)
            )
        return frame(table, to)

    # The notebook API: tables as pyarrow (to="arrow"), pandas or Polars frames.

    def activations(self, layer=None, prompts=None, neurons=None, with_prompts=False, to: str = "arrow"):
        """The kept (prompt, neuron) rows, of ``layer`` (an int or a list), ``prompts`` (prompt_ids,
        or the corpus's ids as strings) and ``neurons`` when given. ``with_prompts``: True joins
        each row with its prompt's fields (`PROMPT_FIELDS` and the corpus's own columns), a list
        joins those columns."""
        where = _matches("prompt_id", self._prompt_ids(prompts)) & _matches("neuron", neurons)
        with self.reading():  # the layers' own files only
            table = self.dataset("activations", layer).to_table(columns=schema.ACTIVATIONS.names, filter=where)
        return frame(self._with_prompts(table, with_prompts), to)

    def prompts(self, columns: list[str] | None = None, to: str = "arrow"):
        """``prompts/``: one row per prompt (tokens, predictions, the corpus's own columns)."""
        if columns is not None:
            missing = sorted(set(columns) - set(self.dataset("prompts").schema.names))
            if missing:
                raise UserError(f"prompts/ has no column {missing}: use one of {self.dataset('prompts').schema.names}")
        wanted = None if columns is None else list(dict.fromkeys(["prompt_id", *columns]))
        table = self.read("prompts", wanted).sort_by("prompt_id")
        return frame(table if columns is None else table.select(columns), to)

    def layers(self, layer=None, with_prompts=False, to: str = "arrow"):
        """``layers/``: per (prompt, layer), how many neurons were selected (red, blue) and kept;
        ``with_prompts`` as in `activations`."""
        with self.reading():
            table = self.dataset("layers").to_table(filter=_matches("layer", _listed(layer)))
        table = table.sort_by([("layer", "ascending"), ("prompt_id", "ascending")])
        return frame(self._with_prompts(table, with_prompts), to)

    def _with_prompts(self, table: pa.Table, with_prompts) -> pa.Table:
        """``table`` with each row's prompt fields appended: all of `prompt_fields` (True), the
        named ones (a list) or none (False). A lookup by prompt_id, so list columns come too."""
        if not with_prompts:
            return table
        columns = self.prompt_fields() if with_prompts is True else list(with_prompts)
        fields = self.prompts(columns=list(dict.fromkeys(["prompt_id", *columns])))
        at = pc.index_in(table["prompt_id"], value_set=fields["prompt_id"])  # [rows] row of each prompt
        for name in columns:
            if name != "prompt_id":
                table = table.append_column(name, fields[name].take(at))
        return table

    def prompt_fields(self) -> list[str]:
        """The prompts/ columns ``with_prompts=True`` joins: all but the token and prediction lists."""
        return [c for c in self.dataset("prompts").schema.names if c not in LIST_COLUMNS]

    @functools.cached_property
    def _index(self) -> pa.Table:
        """Every committed prompt's prompt_id, id and n_tokens (read once; the run is a snapshot
        of its manifest, so what it lists does not change)."""
        return self.prompts(columns=["prompt_id", "id", "n_tokens"])

    def band_codes(self, rows) -> np.ndarray:
        """Per row of ``rows`` (activations, any reader's frame), the band code of each of its
        prompt's tokens: [rows, longest prompt] int8, -1 past a prompt's end (`neuroscan.bands`)."""
        table = rows if isinstance(rows, pa.Table) else pa.table(rows)
        lengths = self._index
        n_tokens = lengths["n_tokens"].take(pc.index_in(table["prompt_id"], value_set=lengths["prompt_id"]))
        return bands.decode_many(table["bands"], n_tokens.to_numpy(zero_copy_only=False))

    def show(self, prompt, layer: int, top: int = 20):
        """The prompt's coloured token strips at ``layer``, one per kept neuron (the ``top`` with
        the highest max_act); shown inline by Jupyter."""
        from results.strips import Strips

        pid = self._prompt_ids([prompt])
        rows = self.activations(layer=layer, prompts=pid).sort_by([("max_act", "descending"), ("neuron", "ascending")])
        info = self.read("prompts", ["prompt_id", "id", "tokens"]).filter(pc.field("prompt_id") == pid[0])
        return Strips(info.to_pylist()[0], int(layer), rows.slice(0, top), self.band_codes(rows.slice(0, top)))

    def _prompt_ids(self, prompts) -> list[int] | None:
        """prompt_ids from ints (prompt_ids) or strings (the corpus's ids); one that is not in
        the run is one line."""
        if prompts is None:
            return None
        prompts = [prompts] if isinstance(prompts, (int, np.integer, str)) else list(prompts)
        table = self._index
        lookup = dict(zip(table["id"].to_pylist(), table["prompt_id"].to_pylist()))
        known = set(lookup.values())
        ids = [lookup.get(p, -1) if isinstance(p, str) else int(p) for p in prompts]
        missing = [p for p, i in zip(prompts, ids) if i not in known]
        if missing:
            raise UserError(
                f"prompt {', '.join(map(repr, missing[:5]))} is not in {self.out}: give prompt_ids or ids from run.prompts()"
            )
        return ids

    def __repr__(self) -> str:
        m = self.manifest
        check = m.verification
        failed = ", FAILED its fidelity check (manifest.verification)" if check is not None and not check.passed else ""
        return (
            f"Run({str(self.out)!r}: {m.status}{failed}, {m.totals.prompts} prompts, {m.n_layers} layers, "
            f"{m.totals.activation_rows} activation rows, model {m.model.id})"
        )

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

    def dataset(self, table: str, layer=None) -> ds.Dataset:
        files = self.files(table, layer)
        if not files:  # e.g. a layer where no neuron was ever kept
            return ds.dataset(schema.TABLES[table].empty_table())
        if table == "activations" and self.manifest.schema_version < 3:  # no up_at_* columns: read as null
            if self.manifest.schema_version >= 2:
                return ds.dataset(files, format=self.fmt, schema=schema.ACTIVATIONS)
            key = ds.partitioning(pa.schema([("layer", pa.int32())]), flavor="hive")  # layer from layer=NN/
            return ds.dataset(
                files,
                format=self.fmt,
                schema=schema.ACTIVATIONS,
                partitioning=key,
                partition_base_dir=str(self.out / table),
            )
        return ds.dataset(files, format=self.fmt)


LIST_COLUMNS = ("token_ids", "tokens", "top_tokens", "top_probs")


def _listed(values) -> list[int] | None:
    """One int (a numpy integer too) or several, as a list of ints; None stays None."""
    if values is None:
        return None
    return [int(values)] if isinstance(values, (int, np.integer)) else [int(v) for v in values]


def _matches(column: str, values) -> ds.Expression:
    """A filter: ``column`` equal to ``values`` (one or a list); True (no filter) for None."""
    values = _listed(values)
    return ds.scalar(True) if values is None else ds.field(column).isin(values)


def frame(table: pa.Table, to: str):
    """``table`` as a pyarrow table (``to="arrow"``), a pandas or a Polars DataFrame."""
    if to == "arrow":
        return table
    if to in ("pandas", "polars"):
        try:
            module = importlib.import_module(to)
        except ImportError:
            raise UserError(f"to={to!r} needs {to}, which is not installed: pip install {to}") from None
        return table.to_pandas() if to == "pandas" else module.from_arrow(table)
    raise UserError(f"to={to!r} is not a table kind: use 'arrow', 'pandas' or 'polars'")


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


FIX = (
    "restore the files from a copy, rescan the damaged parts (`neuroscan scan ... --resume --repair`), "
    "or scan the corpus again into a new --out"
)
