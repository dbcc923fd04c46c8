"""One scan going through the pipelines: its micro-batches, its aggregator, its progress.

The scheduler interleaves the micro-batches of every running `Job`; each job keeps what is
its own: the corpus being read, which micro-batches its aggregator has committed (and which
to send again if Ray restarts that aggregator), its counts, and how it ended.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

from cluster.store import CANCELLED, COMPLETED, FAILED, RUNNING  # noqa: F401 - a job's states are the table's
from neuroscan.config import ScanConfig
from neuroscan.errors import UserError
from neuroscan.manifest import Manifest

Progress = Callable[["Job"], None]
"""Called after every micro-batch a job gets back (and once when it ends)."""


@dataclasses.dataclass
class Sent:
    """A micro-batch handed to a pipeline: what is needed to send its rows again."""

    job: Job
    batch: object
    group: list
    pipe: list
    rows: list  # one ObjectRef per stage


class Job:
    def __init__(
        self,
        key: str,
        cfg: ScanConfig,
        batches: Iterator,
        committed: set[int],
        sink,
        total_prompts: int,
        on_progress: Progress | None = None,
    ):
        self.key, self.cfg, self.sink = key, cfg, sink
        """The scan's aggregator (`cluster.aggregators.Sink`)."""
        self.batches = iter(batches)
        self.committed = committed
        """Micro-batches a resumed run already holds: counted, not scanned again."""
        self.total_prompts = total_prompts
        self.on_progress = on_progress
        self.state = RUNNING
        self.error: BaseException | None = None
        self.reading = True
        """More micro-batches may come from the corpus."""
        self.in_flight = 0
        self.uncommitted: dict[int, Sent] = {}
        """Landed in the aggregator, not yet in a committed part."""
        self.counted: set[int] = set()
        self.incarnation: str | None = None
        self.prompts_done = self.tokens_done = 0
        """Scanned by this job (a resumed run's committed prompts are not)."""
        self.prompts_resumed = 0
        """Prompts of micro-batches a resumed run already held."""
        self.finishing = None  # the aggregator's finish (or commit) call, once nothing is in flight
        self.manifest: Manifest | None = None
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def take(self):
        """The next (micro-batch, prompts) to scan, tagged with this scan's selection; None once
        the corpus is read (or the job stopped). A micro-batch already committed is counted
        as done instead. An error reading the corpus fails the job."""
        while self.reading:
            try:
                batch, group = next(self.batches)
            except StopIteration:
                self.reading = False
                return None
            except UserError as err:
                self.fail(err)
                return None
            if batch.batch_id in self.committed:
                self.prompts_resumed += len(group)
                if self.on_progress:
                    self.on_progress(self)
                continue
            return dataclasses.replace(batch, selection=self.cfg.selection, job=self.key), group
        return None

    def landed(self, sent: Sent, n_prompts: int, n_tokens: int) -> None:
        batch_id = sent.batch.batch_id
        self.uncommitted[batch_id] = sent
        if batch_id not in self.counted:
            self.counted.add(batch_id)
            self.prompts_done += n_prompts
            self.tokens_done += n_tokens
        if self.on_progress:
            self.on_progress(self)

    def fail(self, err: BaseException) -> None:
        """Stop feeding the job; the first error is the one it ends with."""
        if self.error is None:
            self.error = err
        self.state, self.reading = FAILED, False

    def cancel(self) -> None:
        """Stop feeding the job: what is in flight lands and is committed, nothing more is read."""
        if self.state == RUNNING:
            self.state, self.reading = CANCELLED, False

    @property
    def drained(self) -> bool:
        """Nothing left to read or in flight."""
        return not self.reading and self.in_flight == 0
