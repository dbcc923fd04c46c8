"""``neuroscan serve``: resident pipelines that run every submitted scan, and their scans' table.

The pipelines are placed once (model, dtype, stages, replicas: the service's); each scan
brings its own corpus and options (thresholds, cap, top-k, micro-batch budget, format) and
gets its own aggregator (held by one of a few long-lived aggregator processes,
`cluster.aggregators`) and output directory under ``--results``.

Three threads do the work. The admission thread starts queued scans in submission order, up
to ``--max-running``: it reads and tokenises the corpus, claims the output directory and
opens the scan's aggregator. The scheduler's thread interleaves the micro-batches of the
running scans (`cluster.schedule`), so preparing a large corpus never leaves the stages
idle. The checker's thread runs each completed scan's fidelity check (``verify`` prompts run
again through the plain model in float32 on the service's CPU, `workers.verify`); a scan is
seen running until its check has run, but no longer holds a place among ``--max-running``. States and progress live in SQLite (`cluster.store`): a service killed at any moment
and started again resumes its running scans from their manifests and keeps its queue.
HTTP is `cluster.api`'s.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from cluster.aggregators import Aggregators
from cluster.driver import corpus_batches, manifest_header, plan, run_timings, token_strings
from cluster.job import Job
from cluster.output import claim, prepare_output, remove_written
from cluster.pipelines import NODE_CHECK_S, Pipelines
from cluster.schedule import Scheduler
from cluster.store import COMPLETED, ENDED, FAILED, QUEUED, RUNNING, Scan, StateFull, Store
from neuroscan.config import ScanConfig, Selection, ServeConfig
from neuroscan.errors import UserError, tell, user_line
from neuroscan.manifest import read_manifest, verification_line, write_manifest
from neuroscan.memory import MemoryWatch
from workers.verify import Float32Model, verify_scan


class Conflict(UserError):
    """A request the scan's state does not allow (resuming a scan that is running or complete)."""


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
        self.aggregators: Aggregators | None = None
        self.scheduler: Scheduler | None = None
        self.active: dict[str, Active] = {}
        """Scans the scheduler runs (touched by its thread alone)."""
        self.ready: list[Active] = []
        """Scans the admission thread prepared, for the scheduler's thread to take."""
        self.held = 0
        """Scans running, ready or being prepared: at most ``--max-running``."""
        self.watch = MemoryWatch()
        self.wake = threading.Event()
        self.admitting = threading.Event()
        """Set when a scan may be admitted: one was queued, or one ended."""
        self.threads: list[threading.Thread] = []
        self.cancels: set[str] = set()
        """Scans whose cancellation the scheduler's thread has not yet seen."""
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.loaded_s = 0.0
        self.failure: str | None = None
        """Why the scheduler's thread stopped, if it did."""
        self.unrecorded: list[tuple[str, str, str | None]] = []
        """Ends of scans the table had no room for (a full disk), written again by the scheduler's loop."""
        self.checking: queue.Queue[tuple[str, str, int]] = queue.Queue()
        """Completed scans waiting for their fidelity check: (id, output directory, prompts to check)."""
        self.float32: Float32Model | None = None
        """The checks' float32 model, loaded at the first check and kept."""

    def start(self) -> None:
        """Place the pipelines (the model's weights load once) and start the aggregator
        processes, queue again what was running when the service last stopped, and start the
        admission and scheduler threads."""
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
            extra_actors=self.cfg.aggregators,
            say=(lambda line: None) if self.template.quiet else tell,
            ranks=self.template.tensor_parallel,
        )
        self.aggregators = Aggregators(
            self.cfg.aggregators,
            token_strings(probe.tokenizer, probe.vocab_size),
            f"neuroscan-{self.pipelines.run_id}-aggregator",
        )
        self.scheduler = Scheduler(self.pipelines, self.template.window * self.template.replicas, tell)
        self.loaded_s = time.perf_counter() - t0
        self.store.requeue_running()
        self.admitting.set()
        self.float32 = Float32Model(probe.model_path, "cpu")
        threads = (
            (self._admit_loop, "neuroscan-admit"),
            (self._loop, "neuroscan-scheduler"),
            (self._check_loop, "neuroscan-check"),
        )
        for target, name in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.admitting.set()
        for thread in self.threads:
            thread.join(timeout=60)
        for active in [*self.active.values(), *self._take_ready()]:
            self._release(active)
        if self.aggregators is not None:
            self.aggregators.close()
        if self.pipelines is not None:
            self.pipelines.close()
        self.store.close()

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
        if not self.store.cancel_queued(scan.id) and self.store.get(scan.id).state == RUNNING:
            self.store.request_cancel(scan.id)  # seen by the scheduler's thread, now or once the scan is ready
            with self.lock:
                self.cancels.add(scan.id)
            self.wake.set()
        return self.store.get(scan.id)

    def resume(self, scan_id: str) -> Scan:
        """Queue a cancelled or failed scan again: it continues from what it committed."""
        scan = self.find(scan_id)
        if not self.store.requeue(scan.id):
            raise Conflict(
                f"scan {scan.id} is {self.store.get(scan.id).state}: only a cancelled or failed scan can be resumed"
            )
        self.admitting.set()
        return self.store.get(scan.id)

    def delete(self, scan_id: str, files: bool) -> dict:
        """Forget an ended scan. ``files``: also delete what it wrote in its output directory
        (anything else there stays, and the directory with it) and the corpus the service
        stored for it. Without ``files`` the stored corpus stays too where the run is not
        complete, so that `neuroscan scan ... --resume` can still finish it (a corpus given by
        path is the user's and always stays)."""
        scan = self.find(scan_id)
        if scan.state not in ENDED:
            raise Conflict(
                f"scan {scan.id} is {scan.state}: cancel it first (`neuroscan cancel {scan.id}`), then delete it"
            )
        out, kept = Path(scan.out), []
        with ExitStack() as held:
            if files and out.is_dir():
                held.enter_context(claim(out))  # refused while a one-shot scan writes there
                try:
                    kept = remove_written(out)
                    if not kept:
                        out.rmdir()
                except OSError as err:
                    raise Conflict(
                        f"the files of scan {scan.id} could not all be deleted ({err.strerror or err}): "
                        "delete it again in a moment"
                    ) from None
            if not self.store.delete(scan.id):  # resumed meanwhile, or deleted by another request
                now = self.store.get(scan.id)
                if now is None:
                    raise LookupError(f"scan {scan.id} is deleted already: `neuroscan status` lists the scans")
                raise Conflict(f"scan {scan.id} is {now.state} again: cancel it first, then delete it")
        corpus = Path(scan.corpus)
        if corpus.is_relative_to(self.corpora) and (files or scan.state == COMPLETED):
            corpus.unlink(missing_ok=True)
        return {"id": scan.id, "name": scan.name, "out": scan.out, "files_deleted": files, "kept": kept}

    def positions(self) -> dict[str, int]:
        """Queue position of every queued scan (1: next to start)."""
        queued = [s.id for s in self.store.all() if s.state == QUEUED]
        return {scan_id: i + 1 for i, scan_id in enumerate(queued)}

    # The admission thread: a scan is prepared (its corpus read and tokenised, its output
    # directory claimed, its aggregator opened) off the scheduler's thread, which keeps
    # the stages fed meanwhile.

    def _admit_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.admitting.wait(0.5):
                    self.admitting.clear()
                    try:
                        self._admit()
                    except StateFull as err:  # queued scans wait until the table can be written again
                        tell(f"not starting queued scans: {err}")
                        self.stopping.wait(5)
                        self.admitting.set()
        except BaseException as err:
            self.failure = f"the admission of scans stopped: {err}"
            raise

    def _admit(self) -> None:
        """Start queued scans, oldest first, while fewer than ``--max-running`` are held and a
        replica is live (with every replica lost, the queue waits for one placed again)."""
        if not self.pipelines.live:
            return
        for scan in self.store.all():
            with self.lock:
                if self.held >= self.cfg.max_running or self.stopping.is_set():
                    return
            if scan.state != QUEUED or not self.store.start(scan.id):
                continue
            with self.lock:
                self.held += 1
            try:
                active = self._prepare(scan)
            except Exception as err:  # a UserError names the problem; anything else fails this scan only
                self._let_go()
                self._record_end(scan.id, FAILED, _error_line(err, scan.id))
                continue
            if active is None:  # its run was complete already: its check, if it has none yet
                self._let_go()
                self.checking.put((scan.id, scan.out, self.job_config(scan.options, scan.corpus, scan.out).verify))
                continue
            with self.lock:
                self.ready.append(active)
            self.wake.set()

    def _prepare(self, scan: Scan) -> Active | None:
        cfg = self.job_config(scan.options, scan.corpus, scan.out)
        p = plan(cfg, loaded=self.plan.fingerprint)  # the weights the stages hold
        header = manifest_header(cfg, p)
        stack = ExitStack()
        try:
            stack.enter_context(claim(Path(cfg.out)))
            existing = prepare_output(Path(cfg.out), overwrite=False, resume=True, header=header)
            if existing is not None and existing.complete:
                stack.close()
                return None
            batches = stack.enter_context(corpus_batches(cfg, p))
            sink = self.aggregators.open(scan.id, str(Path(cfg.out).resolve()), header, cfg.rows_per_part)
            stack.callback(self.aggregators.release, scan.id)
            committed = existing.committed_batches() if existing else set()
            return Active(Job(scan.id, cfg, batches, committed, sink, p.n_prompts), stack)
        except BaseException:
            stack.close()
            raise

    def _let_go(self) -> None:
        """A held scan ended (or never ran): another may be admitted."""
        with self.lock:
            self.held -= 1
        self.admitting.set()

    def _take_ready(self) -> list[Active]:
        with self.lock:
            ready, self.ready = self.ready, []
        return ready

    # The scheduler's thread.

    def _loop(self) -> None:
        checked = time.monotonic()
        try:
            while not self.stopping.is_set():
                if time.monotonic() - checked >= NODE_CHECK_S:  # idle or busy: a node lost, a replica back
                    checked = time.monotonic()
                    self.scheduler.check_nodes()
                    live = len(self.pipelines.live)
                    self.pipelines.regrow(tell)
                    if len(self.pipelines.live) > live:
                        self.admitting.set()  # a replica is back: a queue held while none was live goes on
                    self._record_ends()
                self._add_ready()
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
                self.store.end(scan_id, FAILED, self.failure)
            raise

    def _add_ready(self) -> None:
        """Hand the prepared scans to the scheduler; one cancelled while it was prepared stops at once."""
        for active in self._take_ready():
            job = active.job
            self.active[job.key] = active
            self.scheduler.add(job)
            if self.store.get(job.key).cancel:
                job.cancel()

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
        error = None if job.error is None else _error_line(job.error, job.key)
        self._release(active)  # before the scan is seen ended: its directory is free by then
        if job.state == COMPLETED:  # seen running until its check has run (`_check`)
            self.checking.put((job.key, job.cfg.out, job.cfg.verify))
        else:
            self._record_end(job.key, job.state, error if job.state == FAILED else None)
        self._let_go()  # the stages take another scan while this one is checked

    # The checker's thread: fidelity checks, off the scheduler's thread (a float32 pass over
    # ``verify`` prompts: seconds for the tiny models, minutes for a 6B one on a CPU).

    def _check_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                scan_id, out, verify = self.checking.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._check(scan_id, Path(out), verify)
            except Exception as err:  # the table could not be written: the next start checks it again
                tell(f"scan {scan_id} completed, not yet recorded: {user_line(err) or repr(err)}")

    def _check(self, scan_id: str, out: Path, verify: int) -> None:
        """A completed scan's fidelity check (`workers.verify`) on the service's CPU, written
        into its manifest under the directory's claim (a check already there, from before a
        restart, is taken as it is); then the scan is recorded completed, with the check's
        line as its error when the rows failed it (the tables are kept). A service stopping
        meanwhile leaves it running in the table: its next start checks it."""
        line = None
        try:
            with claim(out):
                manifest = read_manifest(out)
                if manifest is None:
                    raise UserError(f"{out} has no manifest.json")
                if manifest.verification is None and verify and manifest.complete and manifest.totals.prompts:
                    check = verify_scan(out, manifest, verify, model=self.float32)
                    manifest = dataclasses.replace(manifest, verification=check)
                    write_manifest(out, manifest)
                if manifest.verification is not None and not manifest.verification.passed:
                    line = verification_line(manifest)
        except Exception as err:  # the rows are written: the scan completed, unchecked
            line = f"the fidelity check could not run: {user_line(err) or repr(err)}"
        if not self.stopping.is_set():
            self._record_end(scan_id, COMPLETED, line)

    def _record_end(self, scan_id: str, state: str, error: str | None = None) -> None:
        """Write that a scan ended; on a full disk, again from the scheduler's loop until it can
        (meanwhile the table shows it running)."""
        try:
            self.store.end(scan_id, state, error)
        except StateFull as err:
            tell(f"scan {scan_id} {state}, not yet recorded: {err}")
            with self.lock:
                self.unrecorded.append((scan_id, state, error))

    def _record_ends(self) -> None:
        with self.lock:
            pending, self.unrecorded = self.unrecorded, []
        for end in pending:
            try:
                self.store.end(*end)
            except StateFull:
                with self.lock:
                    self.unrecorded.append(end)

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
        try:
            self.store.progress(job.key, job.total_prompts, done, job.tokens_done, job.seconds)
        except StateFull:  # written again within PROGRESS_EVERY_S, and when the scan ends
            pass


def _error_line(err: BaseException, scan_id: str) -> str:
    """A failed scan's error in one line, with the fix as the service's user gives it. A
    `UserError` raised in an actor is taken as the actor raised it (Ray wraps it with the
    actor's traceback, many coloured lines, keeping the error itself as ``cause``); a one-shot
    scan's "rerun the same command with --resume" is ``neuroscan resume ID`` here."""
    line = user_line(err) or repr(err)
    return line.replace("rerun the same command with --resume", f"resume the scan (`neuroscan resume {scan_id}`)")


SELECTION_FIELDS = {f.name for f in dataclasses.fields(Selection)}
