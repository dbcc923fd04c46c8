"""Streaming micro-batches through the pipelines into the aggregator, surviving restarts.

Per micro-batch the scheduler chains one call per stage (each returns the hidden state for
the next stage and the stage's rows) and hands every stage's rows reference to the
aggregator in one call, so rows never pass through the driver. At most ``window``
micro-batches are in flight.

Faults: stage and aggregator actors are restarted by Ray (bounded) and their calls retried;
the aggregator drops a micro-batch it already has. A restarted aggregator has lost what it
had buffered but not committed, so the scheduler keeps each micro-batch's rows references
until the aggregator reports it committed, and sends them again when the aggregator's
incarnation changes. A prompt too large for device memory even alone stops the run or is
skipped (``--on-error``); an actor that keeps dying, or a direct hand-off that times out, ends
the run with a one-line error, the manifest listing what was committed, ready for ``--resume``.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from neuroscan.config import ScanConfig
from neuroscan.errors import UserError
from neuroscan.manifest import Manifest
from neuroscan.memory import MemoryWatch
from workers.handoff import GROUP
from workers.split import PromptTooLarge


@dataclass
class Sent:
    """A micro-batch handed to a pipeline: what is needed to send its rows again."""

    batch: object
    group: list
    pipe: list
    rows: list  # one ObjectRef per stage


class Scheduler:
    def __init__(
        self,
        cfg: ScanConfig,
        pipelines: list[list],
        aggregator,
        total_prompts: int,
        watch: MemoryWatch,
        handoffs: list[list[str]] | None = None,
    ):
        self.cfg, self.pipelines, self.aggregator, self.watch = cfg, pipelines, aggregator, watch
        self.handoffs = handoffs
        """Per pipeline, the Ray Direct Transport from each stage to the next; None: the object store."""
        self.window = cfg.window * cfg.replicas
        self.in_flight: deque = deque()  # (aggregator call, Sent)
        self.uncommitted: dict[int, Sent] = {}  # acknowledged, not yet in a committed part
        self.counted: set[int] = set()
        self.incarnation: str | None = None
        self.prompts_done = self.tokens_done = 0
        self.bar = tqdm(total=total_prompts, unit="prompt", file=sys.stderr, disable=cfg.quiet, dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def run(self, batches, committed: set[int]) -> tuple[int, int]:
        """Scan every micro-batch not in ``committed``; returns the prompts and tokens it scanned."""
        try:
            for i, (batch, group) in enumerate(self._landing(batches)):
                if batch.batch_id in committed:
                    self.bar.update(len(group))
                    continue
                self.submit(batch, group, self.pipelines[i % len(self.pipelines)])
                while len(self.in_flight) >= self.window:
                    self.settle()
            while self.in_flight:
                self.settle()
        finally:
            self.bar.close()
        return self.prompts_done, self.tokens_done

    def _landing(self, batches) -> Iterator:
        """``batches``, but when reading them fails (the corpus changed under the run), the calls
        in flight land first: killed with calls in flight, stages have Ray print each call's
        retry above the error. Their own errors give way to the reading's (their micro-batches
        are redone on --resume)."""
        source = iter(batches)
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            except UserError:
                while self.in_flight:
                    try:
                        self.settle()
                    except Exception:
                        pass
                raise
            yield item

    def finish(self, timings: dict) -> Manifest:
        """Commit the rest and mark the run complete, resending first if the aggregator restarted."""
        while True:
            incarnation, manifest = self._call(self.aggregator.finish.remote(timings))
            if incarnation == self.incarnation or not self.uncommitted:
                return manifest
            self._restarted(incarnation)
            while self.in_flight:
                self.settle()

    def submit(self, batch, group, pipe) -> None:
        batch_ref = ray.put(batch)
        hidden, rows = None, []
        if self.handoffs is None:
            for stage in pipe:
                hidden, stage_rows = stage.forward.options(num_returns=2).remote(batch_ref, hidden)
                rows.append(stage_rows)
        else:  # the rows through the object store, the hidden state handed over directly (workers.handoff)
            hops = self.handoffs[self.pipelines.index(pipe)]
            for stage, hop in itertools.zip_longest(pipe, hops):
                rows.append(stage.scan.remote(batch_ref, hidden))
                if hop is not None:
                    hidden = stage.handoff.options(concurrency_group=GROUP, tensor_transport=hop).remote(batch.batch_id)
        self._send(Sent(batch, group, pipe, rows))

    def _send(self, sent: Sent) -> None:
        self.in_flight.append((self.aggregator.add.remote(sent.group, *sent.rows), sent))

    def settle(self) -> None:
        ref, sent = self.in_flight.popleft()
        try:
            n_prompts, n_tokens, incarnation, committed = self._call(ref)
        except PromptTooLarge as err:
            if self.cfg.on_error == "stop":
                raise
            self._skip(err, sent)
            return
        batch_id = sent.batch.batch_id
        self.uncommitted[batch_id] = sent
        for done in committed:
            self.uncommitted.pop(done, None)
        if incarnation != self.incarnation:
            self._restarted(incarnation)
        if batch_id not in self.counted:
            self.counted.add(batch_id)
            self.prompts_done += n_prompts
            self.tokens_done += n_tokens
            self.bar.update(n_prompts)
        self.watch.sample()
        self.bar.set_postfix_str(
            f"{self.tokens_done / max(time.perf_counter() - self.t0, 1e-9):,.0f} tok/s", refresh=False
        )

    def _restarted(self, incarnation: str) -> None:
        """The aggregator is new (first contact or a restart): send what it may have lost."""
        first = self.incarnation is None
        self.incarnation = incarnation
        if not first:
            for sent in list(self.uncommitted.values()):
                self._send(sent)

    def _skip(self, err: PromptTooLarge, sent: Sent) -> None:
        """--on-error skip: record the prompt as skipped and rerun the rest of its micro-batch."""
        batch, group = sent.batch, sent.group
        keep = np.flatnonzero(batch.prompt_ids != err.prompt_id)
        skipped = [
            {"prompt_id": err.prompt_id, "id": t.prompt.id, "reason": str(err)}
            for t in group
            if t.prompt.prompt_id == err.prompt_id
        ]
        self._call(self.aggregator.skip.remote(batch.batch_id, skipped, batch_done=len(keep) == 0))
        self.bar.update(1)
        if len(keep):
            self.submit(batch.take(keep, trim=True), [group[i] for i in keep], sent.pipe)

    @staticmethod
    def _call(ref):
        try:
            return ray.get(ref)
        except RayActorError as err:
            reason = str(err).strip().splitlines()[0][:300]
            raise UserError(
                f"a pipeline actor died and could not be restarted ({reason}); committed parts are kept: "
                "fix the cause, then rerun the same command with --resume"
            ) from None
        except TimeoutError as err:  # --handoff direct: a hidden state that never reached the next stage
            reason = str(getattr(err, "cause", err)).strip().splitlines()[0][:300]
            raise UserError(
                f"a stage-to-stage hand-off timed out ({reason}); committed parts are kept: "
                "rerun the same command with --resume (or with --handoff store)"
            ) from None
