"""The aggregator: turns the stages' compact rows into committed table parts.

It receives each micro-batch once all of its stages are done (the driver hands it the
stages' result references, so the rows travel stage -> aggregator without passing through
the driver), converts them to Arrow, and buffers them. When the buffer holds
``rows_per_part`` activation rows, or at the end, it writes a part: one file per layer under
``activations/layer_NN/``, one under ``prompts/``, one under ``layers/`` and the part's
``neuron_parts/`` delta, then replaces the manifest listing the part. A micro-batch
delivered twice (Ray retries deliver at least once) is dropped by its batch id.

Parts are written off the critical path: a full buffer is handed to a committer thread and
``add`` returns at once, so the next micro-batch is converted while the part is encoded
and written (encoding, hashing and fsync release the GIL). Once committed, the part's
``neurons/`` deltas join the run's merge in memory (`aggregator.neurons.NeuronsMerge`), so
the end of the run folds only the last deltas and writes ``neurons/``. One part is written
at a time; the batches of a part are reported committed by the first call after its
manifest is replaced, and a failed write is raised by the next call. The driver keeps every
batch not yet reported committed and resends it to a restarted aggregator, so nothing is lost.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregator import convert
from aggregator.neurons import NeuronsMerge, layer_delta, read_merge
from aggregator.writer import write_table
from neuroscan import schema
from neuroscan.errors import UserError
from neuroscan.manifest import (
    COMPLETE,
    RUNNING,
    Accuracy,
    Counters,
    LayerSummary,
    Manifest,
    Part,
    PartFile,
    Summary,
    read_manifest,
    write_manifest,
)
from neuroscan.memory import MemoryWatch


@dataclass
class Buffer:
    """Micro-batches converted to Arrow and not yet written: the next part."""

    acts: dict[int, list[pa.RecordBatch]] = field(default_factory=lambda: defaultdict(list))
    prompts: list[pa.RecordBatch] = field(default_factory=list)
    layers: list[pa.RecordBatch] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    rows: int = 0
    skipped: list[dict] = field(default_factory=list)
    prompt_count: int = 0
    token_count: int = 0
    layer_counts: dict = field(default_factory=lambda: defaultdict(lambda: [0] * 5))
    accuracy: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


class Aggregator:
    def __init__(
        self,
        out_dir: str,
        header: Manifest,
        token_strings: list[str],
        rows_per_part: int,
        pool: ThreadPoolExecutor | None = None,
    ):
        """``header`` is the new run's manifest: its fixed part (model, selection, bands, stages,
        format, versions...) and no part yet. ``pool``: the threads that encode and write a
        part's files (shared by the aggregators of one process; default: its own).

        When ``out_dir`` already has a manifest (a resumed run, or this actor restarted by Ray)
        the aggregator continues it: committed parts stay, files no part lists are removed,
        and micro-batches already committed are dropped if they arrive again.
        """
        self.out = Path(out_dir)
        self.pool = pool or write_pool()
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuroscan-commit")
        self.writing: Future | None = None  # the part being written, if any
        self.failed: UserError | None = None  # why a part could not be written
        self.rows_per_part = rows_per_part
        self.token_strings = token_strings
        self.run_meta = header.run_metadata()
        self.watch = MemoryWatch()
        existing = read_manifest(self.out)
        if existing is None:
            self.manifest = copy.deepcopy(header)  # the caller's stays as it was
        else:
            self.manifest = existing
            self.manifest.status = RUNNING
            self.manifest.resumed_at.append(_now())
            remove_uncommitted(self.out, self.manifest)
        self.fmt = self.manifest.format
        self.prompts_schema = schema.prompts_schema(self.manifest.corpus.columns)  # a resumed run keeps its own
        k = self.manifest.top_k
        self.neurons = (
            NeuronsMerge(k)
            if existing is None
            else read_merge(self.out, self.manifest.files("neuron_parts/"), self.fmt, k)
        )
        self.committed: set[int] = self.manifest.committed_batches()
        self.seen: set[int] = set(self.committed)
        self.incarnation = uuid.uuid4().hex  # tells the driver when Ray has restarted this actor
        self.just_committed: list[int] = []
        self.buf = Buffer()
        write_manifest(self.out, self.manifest)

    def add(self, group: list, *stages) -> tuple[int, int, str, list[int]]:
        """Take one micro-batch: its prompts (`neuroscan.messages.Tokenized`) and every stage's `StageRows`.

        Returns (prompts, prompt tokens) added ((0, 0) for a duplicate delivery), this
        aggregator's incarnation, and the micro-batches whose part was committed since the
        previous call (or, for a duplicate, the batch itself if it is committed).
        """
        self._collect(wait=False)
        batch_id = stages[0].batch_id
        if batch_id in self.seen:  # a duplicate; if already committed, say so, so the sender can forget it
            done = self._reported()
            return (
                0,
                0,
                self.incarnation,
                done + [batch_id] if batch_id in self.committed and batch_id not in done else done,
            )
        self.seen.add(batch_id)
        buf = self.buf
        prompt_ids = np.array([t.prompt.prompt_id for t in group], dtype=np.int64)
        n_tokens = np.array([len(t.token_ids) for t in group], dtype=np.int32)
        for stage in stages:
            # Arrow wraps numpy without copying; copy once so that no buffered batch pins the
            # stage's object-store buffers until the next commit (the band codes are copied
            # anyway when each row is cut to its prompt's length).
            stage.rows = {name: array if name == "bands" else array.copy() for name, array in stage.rows.items()}
            stage.per_prompt = {name: array.copy() for name, array in stage.per_prompt.items()}
            for layer, batch in convert.activation_batches(stage.rows, stage.start, prompt_ids, n_tokens).items():
                buf.acts[layer].append(batch)
                buf.rows += batch.num_rows
            buf.layers.append(convert.layers_batch(stage.per_prompt, stage.start, prompt_ids, n_tokens))
            self._count_layers(stage)
            if stage.predictions is not None:
                buf.prompts.append(
                    convert.prompts_batch(group, stage.predictions, self.token_strings, self.prompts_schema)
                )
                self._count_accuracy(group, stage.predictions["correct"])
        buf.batches.append(batch_id)
        buf.prompt_count += len(group)
        buf.token_count += int(n_tokens.sum())
        self.watch.sample()
        if buf.rows >= self.rows_per_part:
            self._start_commit()
        return len(group), int(n_tokens.sum()), self.incarnation, self._reported()

    def skip(self, batch_id: int, skipped: list[dict], batch_done: bool) -> None:
        """Record prompts left out (--on-error skip); ``batch_done`` when nothing of the batch remains."""
        self._collect(wait=False)
        self.buf.skipped.extend(skipped)
        if batch_done and batch_id not in self.seen:
            self.seen.add(batch_id)
            self.buf.batches.append(batch_id)

    def _count_layers(self, stage) -> None:
        counts = [stage.per_prompt[name] for name in ("n_selected", "n_kept", "n_above_any", "n_below_any")]
        for offset in range(counts[0].shape[0]):  # [layers, batch] each
            sums = self.buf.layer_counts[str(stage.start + offset)]
            sums[0] += counts[0].shape[1]
            for i, count in enumerate(counts, 1):
                sums[i] += int(count[offset].sum())

    def _count_accuracy(self, group, correct: np.ndarray) -> None:
        for t, c in zip(group, correct.tolist()):
            if c >= 0:
                for key in (("family", t.prompt.family or "(none)"), ("variant", t.prompt.variant or "(none)")):
                    counts = self.buf.accuracy[key]
                    counts[0] += c
                    counts[1] += 1

    def commit(self) -> None:
        """Write what is buffered as the next part now, and wait until it is committed."""
        self._start_commit()
        self.wait()

    def wait(self) -> None:
        """Wait for the part being written (raises its error, a `UserError`, if it failed)."""
        self._collect(wait=True)

    def _start_commit(self) -> None:
        """Hand the buffer to the committer thread (after the part before it is committed)."""
        self._collect(wait=True)
        if not self.buf.batches:
            return
        buf, self.buf = self.buf, Buffer()
        self.writing = self.committer.submit(self._write_part, buf)

    def _collect(self, wait: bool) -> None:
        """Take the result of the part being written, if it is done (or ``wait`` for it). Once a
        part failed to be written every later call raises its error: no other part is started
        (a scan stopping on a full disk would be killed in the middle of writing it)."""
        if self.failed is not None:
            raise self.failed
        if self.writing is None or not (wait or self.writing.done()):
            return
        writing, self.writing = self.writing, None
        try:
            batches = writing.result()
        except UserError as err:
            self.failed = err
            raise
        self.committed.update(batches)
        self.just_committed.extend(batches)

    def _reported(self) -> list[int]:
        """The batches committed since the last report (each reported once)."""
        done, self.just_committed = self.just_committed, []
        return done

    def _write_part(self, buf: Buffer) -> list[int]:
        """Write ``buf`` as part N and list it in the manifest (on the committer thread)."""
        part = max((p.part for p in self.manifest.parts), default=0) + 1  # after parts dropped by --repair too
        stem = f"part-{part:05d}"
        files = []
        try:
            acts = {layer: self._table(schema.ACTIVATIONS, buf.acts[layer]) for layer in sorted(buf.acts)}
            tables = [(table, f"{schema.layer_dir(layer)}/{stem}") for layer, table in acts.items()]
            tables += [
                (self._table(self.prompts_schema, buf.prompts), f"prompts/{stem}"),
                (self._table(schema.LAYERS, buf.layers), f"layers/{stem}"),
            ]
            # Encoding, hashing, fsync and the deltas' sorts release the GIL: all run in parallel.
            futures = [self.pool.submit(write_table, table, self.out, rel, self.fmt) for table, rel in tables]
            red = self.manifest.bands.red
            making = {
                layer: self.pool.submit(layer_delta, layer, table, self.neurons.k, red) for layer, table in acts.items()
            }
            deltas = {layer: d.result() for layer, d in making.items()}
            delta = pa.concat_tables(list(deltas.values())) if deltas else schema.NEURONS.empty_table()
            futures.append(self.pool.submit(write_table, delta, self.out, f"neuron_parts/{stem}", self.fmt))
            errors = []
            for future in futures:
                try:
                    files.append(future.result())
                except OSError as err:
                    errors.append(err)
            if errors:
                raise errors[0]
        except OSError as err:
            for f in files:  # never listed: remove so that the directory holds committed parts only
                (self.out / f.path).unlink(missing_ok=True)
            raise UserError(
                f"writing part {part} to {self.out} failed ({err.strerror or err}); "
                f"{f'parts 1-{part - 1} are intact' if part > 1 else 'no part was committed yet'}: "
                "fix the disk (space, permissions), then rerun the same command with --resume"
            ) from None
        self.manifest.parts.append(Part(part, sorted(buf.batches), files))
        self._fold_counts(buf)
        self.manifest.summary = summarize(self.manifest.counters)
        write_manifest(self.out, self.manifest)
        # Committed: its deltas join the neurons merge (folded here, off the critical path).
        for layer, d in deltas.items():
            self.neurons.add(layer, d)
        list(self.pool.map(self.neurons.fold, self.neurons.due()))
        return list(buf.batches)

    def _fold_counts(self, buf: Buffer) -> None:
        """Counters cover committed parts only, so a resumed run counts every batch once."""
        totals, counters = self.manifest.totals, self.manifest.counters
        totals.prompts += buf.prompt_count
        totals.tokens += buf.token_count
        totals.activation_rows += buf.rows
        self.manifest.skipped.extend(buf.skipped)
        for layer, counts in buf.layer_counts.items():
            sums = counters.layers.setdefault(layer, [0] * len(counts))
            counters.layers[layer] = [s + c for s, c in zip(sums, counts)]
        for (by, value), (correct, total) in buf.accuracy.items():
            groups = counters.accuracy.setdefault(by, {})
            c, n = groups.get(value, [0, 0])
            groups[value] = [c + correct, n + total]

    def _table(self, table_schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.Table:
        return pa.Table.from_batches(batches, schema=table_schema).replace_schema_metadata(
            schema.with_run_metadata(table_schema, self.run_meta).metadata
        )

    def memory(self) -> dict[str, float]:
        return self.watch.report()

    def finish(self, timings: dict) -> tuple[str, Manifest]:
        """Commit what is buffered, mark the run complete; returns (incarnation, final manifest).

        ``aggregator_lag_s`` is how long the last commit kept the driver waiting after the
        stages had finished: the aggregator's lag behind the pipeline."""
        t0 = time.perf_counter()
        self.commit()
        table = self.neurons.table(self.pool)
        table = table.replace_schema_metadata(schema.with_run_metadata(table.schema, self.run_meta).metadata)
        try:
            self.manifest.neurons = write_table(table, self.out, "neurons/part-00001", self.fmt)
            self.manifest.empty_layers = self._write_empty_layers()
        except OSError as err:  # the files are not listed: a resumed run removes and writes them again
            self.manifest.neurons, self.manifest.empty_layers = None, []
            raise UserError(
                f"writing neurons/ to {self.out} failed ({err.strerror or err}); every part is committed: "
                "fix the disk (space, permissions), then rerun the same command with --resume"
            ) from None
        timings = {**timings, "aggregator_lag_s": time.perf_counter() - t0}
        self.manifest.summary = summarize(self.manifest.counters)
        self.manifest.timings = {**timings, "finished_at": _now()}
        self.manifest.status = COMPLETE
        write_manifest(self.out, self.manifest)
        return self.incarnation, self.manifest

    def _write_empty_layers(self) -> list[PartFile]:
        """An empty activations file (the schema, no rows) for each layer no part kept a row of:
        every ``layer_NN`` directory exists, and a run that kept nothing reads as an empty table
        instead of pyarrow's FileNotFoundError or DuckDB's "no files found"."""
        kept = {f.path.rsplit("/", 1)[0] for f in self.manifest.files("activations/")}
        empty = self._table(schema.ACTIVATIONS, [])
        return [
            write_table(empty, self.out, f"{schema.layer_dir(layer)}/part-00000", self.fmt)
            for layer in range(self.manifest.n_layers)
            if schema.layer_dir(layer) not in kept
        ]

    def close(self) -> None:
        """Wait for the part being written, if any, and stop the committer thread (an error of
        that part was already reported, or is left to a resumed run)."""
        self.committer.shutdown(wait=True)


def summarize(counters: Counters) -> Summary:
    """Per-layer means per prompt and accuracy, from the committed parts' counters."""
    layers = {
        layer: LayerSummary(
            mean_selected=s[1] / s[0], mean_kept=s[2] / s[0], mean_red=s[3] / s[0], mean_blue=s[4] / s[0]
        )
        for layer, s in sorted(counters.layers.items(), key=lambda item: int(item[0]))
    }
    accuracy = {
        by: {value: Accuracy(correct=c, total=n, accuracy=c / n) for value, (c, n) in sorted(groups.items())}
        for by, groups in counters.accuracy.items()
    }
    return Summary(layers=layers, accuracy=accuracy)


def write_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="neuroscan-write")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def remove_uncommitted(out: Path, manifest: Manifest) -> None:
    """Delete table files no committed part lists (a part cut short by a crash)."""
    listed = {f.path for f in manifest.files()}
    for table in schema.OUTPUT_DIRS:
        for path in sorted((out / table).rglob("*")) if (out / table).exists() else []:
            if path.is_file() and path.relative_to(out).as_posix() not in listed:
                path.unlink()
