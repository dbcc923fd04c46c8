"""``neuroscan serve``: resident pipelines that run every submitted scan, and their scans' table.

The pipelines are placed once (model, dtype, stages, replicas: the service's); each scan
brings its own corpus and options (thresholds, cap, top-k, micro-batch budget, format) and
gets its own aggregator and output directory under ``--results``. A thread runs the
scheduler: it admits queued scans in submission order, interleaves their micro-batches
(`cluster.schedule`), and records states and progress in SQLite (`cluster.store`), so that
a service killed at any moment and started again resumes its running scans from their
manifests and keeps its queue. HTTP is `cluster.api`'s.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import ray

from cluster.driver import corpus_batches, manifest_header, plan, run_timings, start_aggregator
from cluster.job import Job
from cluster.output import claim, prepare_output
from cluster.pipelines import Pipelines
from cluster.schedule import Scheduler
from cluster.store import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Scan, Store
from neuroscan.config import ScanConfig, Selection, ServeConfig
from neuroscan.errors import UserError
from neuroscan.memory import MemoryWatch

PROGRESS_EVERY_S = 0.5
"""How often a running scan's progress is written to the table."""


@dataclasses.dataclass
class Active:
    """A scan the scheduler holds, and what is open for it."""

    job: Job
    stack: ExitStack  # the output directory's claim and the corpus's read-ahead
    written_at: float = 0.0


class Service:
    def __init__(self, cfg: ServeConfig, template: ScanConfig):
        self.cfg, self.template = cfg, template
        self.results = Path(cfg.results).resolve()
        self.state_dir = Path(cfg.state).resolve() if cfg.state else self.results / ".neuroscan-service"
        self.corpora = self.state_dir / "corpora"
        self.corpora.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "scans.sqlite")
        self.pipelines: Pipelines | None = None
        self.scheduler: Scheduler | None = None
        self.active: dict[str, Active] = {}
        self.watch = MemoryWatch()
        self.wake = threading.Event()
        self.admitting = threading.Event()
        """Set when a scan may be admitted: one was queued, or one ended."""
        self.cancels: set[str] = set()
        """Scans whose cancellation the scheduler's thread has not yet seen."""
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.loaded_s = 0.0
        self.failure: str | None = None
        """Why the scheduler's thread stopped, if it did."""

    def start(self) -> None:
        """Place the pipelines (the model's weights load once), queue again what was running
        when the service last stopped, and start the scheduler's thread."""
        t0 = time.perf_counter()
        probe = plan(dataclasses.replace(self.template, prompts="seed", out=str(self.results)))
        self.plan = probe
        self.pipelines = Pipelines.open(
            probe.model_path,
            probe.bounds,
            self.template.device,
            probe.dtype,
            self.template.replicas,
            self.template.gpus_per_stage,
            self.template.handoff,
            extra_actors=self.cfg.max_running,
        )
        self.scheduler = Scheduler(self.pipelines, self.template.window * self.template.replicas)
        self.loaded_s = time.perf_counter() - t0
        self.store.requeue_running()
        self.admitting.set()
        self.thread = threading.Thread(target=self._loop, name="neuroscan-scheduler", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        for active in list(self.active.values()):
            self._release(active)
        if self.pipelines is not None:
            self.pipelines.close()

    # The HTTP side: quick, never waits on the scheduler.

    def submit(self, corpus: Path, options: dict, name: str | None, n_prompts: int) -> Scan:
        """Queue a scan of ``corpus`` (already checked) with ``options`` (already checked)."""
        scan_id = uuid.uuid4().hex[:12]
        name = name or scan_id
        if (self.results / name).exists():  # a name the table holds is refused by `Store.add`
            raise UserError(f"a scan named {name!r} exists already: choose another --name")
        scan = Scan(
            id=scan_id,
            name=name,
            state=QUEUED,
            options=options,
            corpus=str(corpus),
            out=str(self.results / name),
            submitted_at=time.time(),
            prompts_total=n_prompts,
        )
        if not self.store.add(scan):
            raise UserError(f"a scan named {name!r} exists already: choose another --name")
        self.store.progress(scan_id, n_prompts, 0, 0, 0.0)
        self.admitting.set()
        self.wake.set()
        return self.store.get(scan_id)

    def job_config(self, options: dict, corpus: str, out: str) -> ScanConfig:
        """The scan's configuration: the service's pipelines, the scan's own options."""
        selection = Selection(**{k: v for k, v in options.items() if k in SELECTION_FIELDS})
        rest = {k: v for k, v in options.items() if k not in SELECTION_FIELDS}
        return dataclasses.replace(
            self.template, prompts=corpus, out=out, selection=selection, resume=True, quiet=True, **rest
        )

    def find(self, scan_id: str) -> Scan:
        """The scan whose id is or starts with ``scan_id`` (at least 4 characters), or one line."""
        found = self.store.find(scan_id) if len(scan_id) >= 4 else []
        if len(found) != 1:
            problem = "matches no scan" if not found else f"matches {len(found)} scans"
            raise LookupError(f"scan id {scan_id!r} {problem}: give more of the id (`neuroscan status` lists them)")
        return found[0]

    def cancel(self, scan_id: str) -> Scan:
        scan = self.find(scan_id)
        if scan.state == QUEUED:
            self.store.set_state(scan.id, CANCELLED, "cancelled before it started")
        elif scan.state == RUNNING:
            self.store.request_cancel(scan.id)
            with self.lock:
                self.cancels.add(scan.id)
            self.wake.set()
        return self.store.get(scan.id)

    def positions(self) -> dict[str, int]:
        """Queue position of every queued scan (1: next to start)."""
        queued = [s.id for s in self.store.all() if s.state == QUEUED]
        return {scan_id: i + 1 for i, scan_id in enumerate(queued)}

    # The scheduler's thread.

    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self._admit()
                self._cancel_requested()
                if self.scheduler.jobs:
                    for job in self.scheduler.step(self._timings, wait_s=0.2):
                        self._end(job)
                    self._write_progress()
                else:
                    self.wake.wait(0.5)
                    self.wake.clear()
        except BaseException as err:
            self.failure = f"the scheduler stopped: {err}"
            for scan_id in list(self.active):
                self.store.set_state(scan_id, FAILED, self.failure)
            raise

    def _admit(self) -> None:
        """Start queued scans, oldest first, while fewer than ``--max-running`` run (looked up
        only when one was queued or one ended)."""
        if not self.admitting.is_set():
            return
        self.admitting.clear()
        for scan in self.store.all():
            if len(self.active) >= self.cfg.max_running or self.stopping.is_set():
                return
            if scan.state != QUEUED:
                continue
            try:
                self._start_job(scan)
            except UserError as err:
                self.store.set_state(scan.id, FAILED, str(err))

    def _start_job(self, scan: Scan) -> None:
        cfg = self.job_config(scan.options, scan.corpus, scan.out)
        p = plan(cfg)
        header = manifest_header(cfg, p)
        stack = ExitStack()
        try:
            stack.enter_context(claim(Path(cfg.out)))
            existing = prepare_output(Path(cfg.out), overwrite=False, resume=True, header=header)
            if existing is not None and existing.complete:
                stack.close()
                self.store.set_state(scan.id, COMPLETED)
                return
            batches = stack.enter_context(corpus_batches(cfg, p))
            aggregator = start_aggregator(cfg, p, header, f"neuroscan-{self.pipelines.run_id}-aggregator-{scan.id}")
            stack.callback(ray.kill, aggregator)
            committed = existing.committed_batches() if existing else set()
            job = Job(scan.id, cfg, batches, committed, aggregator, p.n_prompts)
        except BaseException:
            stack.close()
            raise
        self.store.set_state(scan.id, RUNNING)
        self.active[scan.id] = Active(job, stack)
        self.scheduler.add(job)

    def _cancel_requested(self) -> None:
        with self.lock:
            cancels, self.cancels = self.cancels, set()
        for scan_id in cancels:
            if scan_id in self.active:
                self.active[scan_id].job.cancel()

    def _timings(self, job: Job) -> dict:
        return run_timings(job, self.pipelines, self.watch)

    def _end(self, job: Job) -> None:
        active = self.active.pop(job.key)
        self._progress(job)
        error = None if job.error is None else (str(job.error) or type(job.error).__name__)
        self.store.set_state(job.key, job.state, error if job.state == FAILED else None)
        self._release(active)
        self.admitting.set()

    def _release(self, active: Active) -> None:
        active.stack.close()

    def _write_progress(self) -> None:
        now = time.perf_counter()
        for active in self.active.values():
            if now - active.written_at >= PROGRESS_EVERY_S:
                active.written_at = now
                self._progress(active.job)

    def _progress(self, job: Job) -> None:
        done = job.prompts_done + job.prompts_resumed
        self.store.progress(job.key, job.total_prompts, done, job.tokens_done, job.seconds)


SELECTION_FIELDS = {f.name for f in dataclasses.fields(Selection)}
