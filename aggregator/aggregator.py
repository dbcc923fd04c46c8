"""The aggregator: turns the stages' compact rows into committed table parts.

It receives each micro-batch once all of its stages are done (the driver hands it the
stages' result references, so the rows travel stage -> aggregator without passing through
the driver), converts them to Arrow, and buffers them. When the buffer holds
``rows_per_part`` activation rows, or at the end, it writes a part: one file per layer under
``activations/layer=NN/``, one under ``prompts/`` and one under ``layers/``, then replaces
the manifest listing the part. A micro-batch delivered twice (Ray retries deliver at least
once) is dropped by its batch id.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregator import schema
from aggregator.manifest import read_manifest, write_manifest
from aggregator.neurons import neurons_table, part_delta
from aggregator.writer import write_table
from cluster.errors import UserError
from cluster.memory import MemoryWatch


class Aggregator:
    def __init__(self, out_dir: str, header: dict, token_strings: list[str], fmt: str = "parquet", rows_per_part: int = 500_000):
        """``header`` is the manifest's fixed part (model, selection, bands, stages, versions...).

        When ``out_dir`` already has a manifest (a resumed run, or this actor restarted by Ray)
        the aggregator continues it: committed parts stay, files no part lists are removed,
        and micro-batches already committed are dropped if they arrive again.
        """
        self.out = Path(out_dir)
        self.fmt = fmt
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="neuroscan-write")
        self.rows_per_part = rows_per_part
        self.token_strings = token_strings
        self.run_meta = {k: header[k] for k in ("model", "selection", "bands") if k in header}
        self.watch = MemoryWatch()
        existing = read_manifest(self.out)
        if existing is None:
            self.manifest = {
                **header, "status": "running", "parts": [],
                "totals": {"prompts": 0, "tokens": 0, "activation_rows": 0},
                "counters": {"layers": {}, "accuracy": {"family": {}, "variant": {}}}, "skipped": [],
            }
        else:
            self.manifest = {**existing, "status": "running"}
            self.manifest.setdefault("resumed_at", []).append(_now())
            remove_uncommitted(self.out, self.manifest)
        self.seen: set[int] = {b for part in self.manifest["parts"] for b in part["batches"]}
        self.incarnation = uuid.uuid4().hex  # tells the driver when Ray has restarted this actor
        self.just_committed: list[int] = []
        self._reset_buffer()
        write_manifest(self.out, self.manifest)

    def _reset_buffer(self) -> None:
        self.buf_acts: dict[int, list[pa.RecordBatch]] = defaultdict(list)
        self.buf_prompts: list[pa.RecordBatch] = []
        self.buf_layers: list[pa.RecordBatch] = []
        self.buf_batches: list[int] = []
        self.buf_rows = 0
        self.buf_skipped: list[dict] = []
        self.buf_counts = {"prompts": 0, "tokens": 0, "layers": defaultdict(lambda: [0, 0, 0]), "accuracy": defaultdict(lambda: [0, 0])}

    def add(self, group: list, *stages) -> tuple[int, int, str, list[int]]:
        """Take one micro-batch: its prompts (`prompts.batching.Tokenized`) and every stage's `StageRows`.

        Returns (prompts, prompt tokens) added ((0, 0) for a duplicate delivery), this
        aggregator's incarnation, and the micro-batches committed by this call.
        """
        self.just_committed = []
        batch_id = stages[0].batch_id
        if batch_id in self.seen:  # a duplicate; if already committed, say so, so the sender can forget it
            return 0, 0, self.incarnation, [batch_id] if batch_id not in self.buf_batches else []
        self.seen.add(batch_id)
        prompt_ids = np.array([t.prompt.prompt_id for t in group], dtype=np.int64)
        n_tokens = np.array([len(t.token_ids) for t in group], dtype=np.int32)
        for stage in stages:
            # Arrow wraps numpy without copying; copy once so that no buffered batch pins the
            # stage's object-store buffers until the next commit (the band codes are copied
            # anyway when each row is cut to its prompt's length).
            stage.rows = {name: array if name == "bands" else array.copy() for name, array in stage.rows.items()}
            stage.per_prompt = {name: array.copy() for name, array in stage.per_prompt.items()}
            for layer, batch in schema.activation_batches(stage.rows, stage.start, prompt_ids, n_tokens).items():
                self.buf_acts[layer].append(batch)
                self.buf_rows += batch.num_rows
            self.buf_layers.append(schema.layers_batch(stage.per_prompt, stage.start, prompt_ids, n_tokens))
            self._count_layers(stage)
            if stage.predictions is not None:
                self.buf_prompts.append(schema.prompts_batch(group, stage.predictions, self.token_strings))
                self._count_accuracy(group, stage.predictions["correct"])
        self.buf_batches.append(batch_id)
        self.buf_counts["prompts"] += len(group)
        self.buf_counts["tokens"] += int(n_tokens.sum())
        self.watch.sample()
        if self.buf_rows >= self.rows_per_part:
            self.commit()
        return len(group), int(n_tokens.sum()), self.incarnation, self.just_committed

    def skip(self, batch_id: int, skipped: list[dict], batch_done: bool) -> None:
        """Record prompts left out (--on-error skip); ``batch_done`` when nothing of the batch remains."""
        self.buf_skipped.extend(skipped)
        if batch_done and batch_id not in self.seen:
            self.seen.add(batch_id)
            self.buf_batches.append(batch_id)

    def _count_layers(self, stage) -> None:
        selected, kept = stage.per_prompt["n_selected"], stage.per_prompt["n_kept"]  # [layers, batch]
        for offset in range(selected.shape[0]):
            sums = self.buf_counts["layers"][str(stage.start + offset)]
            sums[0] += selected.shape[1]
            sums[1] += int(selected[offset].sum())
            sums[2] += int(kept[offset].sum())

    def _count_accuracy(self, group, correct: np.ndarray) -> None:
        for t, c in zip(group, correct.tolist()):
            if c >= 0:
                for key in (("family", t.prompt.family or "(none)"), ("variant", t.prompt.variant or "(none)")):
                    counts = self.buf_counts["accuracy"][key]
                    counts[0] += c
                    counts[1] += 1

    def commit(self) -> None:
        """Write the buffered micro-batches as part N and list it in the manifest."""
        if not self.buf_batches:
            return
        part = len(self.manifest["parts"]) + 1
        stem = f"part-{part:05d}"
        files = []
        try:
            acts = {layer: self._table(schema.ACTIVATIONS, self.buf_acts[layer]) for layer in sorted(self.buf_acts)}
            jobs = [(table, f"activations/layer={layer:02d}/{stem}") for layer, table in acts.items()]
            jobs += [(self._table(schema.PROMPTS, self.buf_prompts), f"prompts/{stem}"), (self._table(schema.LAYERS, self.buf_layers), f"layers/{stem}")]
            jobs.append((part_delta(acts, self.manifest.get("top_k", 20), self.manifest["bands"]["red"]), f"neuron_parts/{stem}"))
            # Encoding, hashing and fsync release the GIL: the part's files are written in parallel.
            futures = [self.pool.submit(write_table, table, self.out, rel, self.fmt) for table, rel in jobs]
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
                f"writing part {part} to {self.out} failed ({err.strerror or err}); parts 1-{part - 1} are intact: "
                "fix the disk (space, permissions), then rerun the same command with --resume"
            ) from None
        self.manifest["parts"].append(
            {"part": part, "batches": sorted(self.buf_batches), "files": [f.to_dict() for f in files]}
        )
        self._fold_counts()
        self.manifest["summary"] = self.summary()
        write_manifest(self.out, self.manifest)
        self.just_committed = list(self.buf_batches)
        self._reset_buffer()

    def _fold_counts(self) -> None:
        """Counters cover committed parts only, so a resumed run counts every batch once."""
        totals, counters, pending = self.manifest["totals"], self.manifest["counters"], self.buf_counts
        totals["prompts"] += pending["prompts"]
        totals["tokens"] += pending["tokens"]
        totals["activation_rows"] += self.buf_rows
        self.manifest.setdefault("skipped", []).extend(self.buf_skipped)
        for layer, (n, selected, kept) in pending["layers"].items():
            sums = counters["layers"].setdefault(layer, [0, 0, 0])
            counters["layers"][layer] = [sums[0] + n, sums[1] + selected, sums[2] + kept]
        for (by, value), (correct, total) in pending["accuracy"].items():
            c, n = counters["accuracy"][by].get(value, [0, 0])
            counters["accuracy"][by][value] = [c + correct, n + total]

    def _table(self, table_schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.Table:
        return pa.Table.from_batches(batches, schema=table_schema).replace_schema_metadata(
            schema.with_run_metadata(table_schema, self.run_meta).metadata
        )

    def summary(self) -> dict:
        """Per-layer means per prompt and accuracy, from the committed counters."""
        counters = self.manifest["counters"]
        layers = {
            layer: {"mean_selected": s[1] / s[0], "mean_kept": s[2] / s[0]}
            for layer, s in sorted(counters["layers"].items(), key=lambda item: int(item[0]))
        }
        accuracy = {
            by: {value: {"correct": c, "total": n, "accuracy": c / n} for value, (c, n) in sorted(groups.items())}
            for by, groups in counters["accuracy"].items()
        }
        return {"layers": layers, "accuracy": accuracy}

    def memory(self) -> dict[str, float]:
        return self.watch.report()

    def finish(self, timings: dict) -> tuple[str, dict]:
        """Commit what is buffered, mark the run complete; returns (incarnation, final manifest).

        ``aggregator_lag_s`` is how long the last commit kept the driver waiting after the
        stages had finished: the aggregator's lag behind the pipeline."""
        t0 = time.perf_counter()
        self.commit()
        table = neurons_table(self.out, self.manifest, self.manifest.get("top_k", 20))
        table = table.replace_schema_metadata(schema.with_run_metadata(table.schema, self.run_meta).metadata)
        self.manifest["neurons"] = write_table(table, self.out, "neurons/part-00001", self.fmt).to_dict()
        timings = {**timings, "aggregator_lag_s": time.perf_counter() - t0}
        self.manifest["summary"] = self.summary()
        self.manifest["timings"] = {**timings, "finished_at": _now()}
        self.manifest["status"] = "complete"
        write_manifest(self.out, self.manifest)
        return self.incarnation, self.manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def remove_uncommitted(out: Path, manifest: dict) -> None:
    """Delete table files no committed part lists (a part cut short by a crash)."""
    listed = {f["path"] for part in manifest["parts"] for f in part["files"]}
    for table in schema.OUTPUT_DIRS:
        for path in sorted((out / table).rglob("*")) if (out / table).exists() else []:
            if path.is_file() and path.relative_to(out).as_posix() not in listed:
                path.unlink()
