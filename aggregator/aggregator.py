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

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregator import schema
from aggregator.manifest import write_manifest
from aggregator.writer import write_table
from cluster.memory import MemoryWatch


class Aggregator:
    def __init__(self, out_dir: str, header: dict, token_strings: list[str], fmt: str = "parquet", rows_per_part: int = 500_000):
        """``header`` is the manifest's fixed part (model, selection, bands, stages, versions...)."""
        self.out = Path(out_dir)
        self.fmt = fmt
        self.rows_per_part = rows_per_part
        self.token_strings = token_strings
        self.run_meta = {k: header[k] for k in ("model", "selection", "bands") if k in header}
        self.manifest = {**header, "status": "running", "parts": [], "totals": {"prompts": 0, "tokens": 0, "activation_rows": 0}}
        self.seen: set[int] = set()
        self.watch = MemoryWatch()
        self._reset_buffer()
        self.layer_sums = defaultdict(lambda: np.zeros(3, dtype=np.float64))  # layer -> prompts, selected, kept
        self.accuracy = defaultdict(lambda: [0, 0])  # ("family" | "variant", value) -> [correct, with answer]
        write_manifest(self.out, self.manifest)

    def _reset_buffer(self) -> None:
        self.buf_acts: dict[int, list[pa.RecordBatch]] = defaultdict(list)
        self.buf_prompts: list[pa.RecordBatch] = []
        self.buf_layers: list[pa.RecordBatch] = []
        self.buf_batches: list[int] = []
        self.buf_rows = 0

    def add(self, group: list, *stages) -> tuple[int, int]:
        """Take one micro-batch: its prompts (`prompts.batching.Tokenized`) and every stage's `StageRows`.

        Returns (prompts, prompt tokens) added; (0, 0) for a duplicate delivery.
        """
        batch_id = stages[0].batch_id
        if batch_id in self.seen:
            return 0, 0
        self.seen.add(batch_id)
        prompt_ids = np.array([t.prompt.prompt_id for t in group], dtype=np.int64)
        n_tokens = np.array([len(t.token_ids) for t in group], dtype=np.int32)
        for stage in stages:
            # Arrow wraps numpy without copying; copy once so that no buffered batch pins the
            # stage's object-store buffers until the next commit.
            stage.rows = {name: array.copy() for name, array in stage.rows.items()}
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
        totals = self.manifest["totals"]
        totals["prompts"] += len(group)
        totals["tokens"] += int(n_tokens.sum())
        self.watch.sample()
        if self.buf_rows >= self.rows_per_part:
            self.commit()
        return len(group), int(n_tokens.sum())

    def _count_layers(self, stage) -> None:
        selected, kept = stage.per_prompt["n_selected"], stage.per_prompt["n_kept"]  # [layers, batch]
        for offset in range(selected.shape[0]):
            sums = self.layer_sums[stage.start + offset]
            sums += (selected.shape[1], selected[offset].sum(), kept[offset].sum())

    def _count_accuracy(self, group, correct: np.ndarray) -> None:
        for t, c in zip(group, correct.tolist()):
            if c >= 0:
                for key in (("family", t.prompt.family), ("variant", t.prompt.variant)):
                    counts = self.accuracy[key]
                    counts[0] += c
                    counts[1] += 1

    def commit(self) -> None:
        """Write the buffered micro-batches as part N and list it in the manifest."""
        if not self.buf_batches:
            return
        part = len(self.manifest["parts"]) + 1
        stem = f"part-{part:05d}"
        files = []
        for layer in sorted(self.buf_acts):
            table = self._table(schema.ACTIVATIONS, self.buf_acts[layer])
            files.append(write_table(table, self.out, f"activations/layer={layer:02d}/{stem}", self.fmt))
        files.append(write_table(self._table(schema.PROMPTS, self.buf_prompts), self.out, f"prompts/{stem}", self.fmt))
        files.append(write_table(self._table(schema.LAYERS, self.buf_layers), self.out, f"layers/{stem}", self.fmt))
        self.manifest["parts"].append(
            {"part": part, "batches": sorted(self.buf_batches), "files": [f.to_dict() for f in files]}
        )
        self.manifest["totals"]["activation_rows"] += self.buf_rows
        self.manifest["summary"] = self.summary()
        write_manifest(self.out, self.manifest)
        self._reset_buffer()

    def _table(self, table_schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.Table:
        return pa.Table.from_batches(batches, schema=table_schema).replace_schema_metadata(
            schema.with_run_metadata(table_schema, self.run_meta).metadata
        )

    def summary(self) -> dict:
        layers = {
            str(layer): {"mean_selected": s[1] / s[0], "mean_kept": s[2] / s[0]}
            for layer, s in sorted(self.layer_sums.items())
        }
        accuracy = {"family": {}, "variant": {}}
        for (by, value), (c, n) in sorted(self.accuracy.items(), key=lambda item: (item[0][0], str(item[0][1]))):
            accuracy[by][value or "(none)"] = {"correct": c, "total": n, "accuracy": c / n}
        return {"layers": layers, "accuracy": accuracy}

    def memory(self) -> dict[str, float]:
        return self.watch.report()

    def finish(self, timings: dict) -> dict:
        """Commit what is buffered, mark the run complete; returns the final manifest."""
        self.commit()
        self.manifest["summary"] = self.summary()
        self.manifest["timings"] = {**timings, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.manifest["status"] = "complete"
        write_manifest(self.out, self.manifest)
        return self.manifest
