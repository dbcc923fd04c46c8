"""Streaming the micro-batches of every running scan through the pipelines into their aggregators.

Per micro-batch the scheduler chains one call per stage (each returns the hidden state for
the next stage and the stage's rows) and hands every stage's rows reference to the scan's
aggregator in one call, so rows never pass through the driver. At most ``window``
micro-batches are in flight, taken from the running scans in turn (one from each, round
robin): a small scan submitted behind a large one is not queued behind it, and many small
scans keep the stages as busy as one large scan. Each micro-batch carries its scan's
selection, so scans with other thresholds share the same stages.

Faults: a node that leaves the cluster takes its replicas with it; their micro-batches in
flight go to the replicas left, and the scans go on (with none left they fail, resumable).
An actor whose process stops (SIGSTOP) while Ray sees it alive is found by `restart_silent`
within about ``STALL_S + 2 x PING_S`` seconds and restarted.
Stage and aggregator actors are restarted by Ray (bounded) and their calls retried;
the aggregator drops a micro-batch it already has. A restarted aggregator has lost what it
had buffered but not committed, so each job keeps its micro-batches' rows references until
its aggregator reports them committed, and sends them again when the aggregator's
incarnation changes. A prompt too large for device memory even alone fails its scan or is
skipped (``--on-error``); an actor that keeps dying, a direct hand-off that times out or a
corpus edited while it is read fails the scan with a one-line error once its calls in flight
have landed, the manifest listing what was committed, ready for ``--resume``.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque

import numpy as np
import ray
from ray.exceptions import RayActorError

from cluster import placement
from cluster.job import CANCELLED, COMPLETED, FAILED, Job, Sent
from cluster.pipelines import NODE_CHECK_S, Pipelines
from neuroscan.errors import UserError
from workers.handoff import GROUP
from workers.split import PromptTooLarge

STALL_S = float(os.environ.get("NEUROSCAN_STALL_S") or 30)
"""With calls in flight and none answered for this long, every stage of the live replicas and
every aggregator host is asked to answer at once (``memory``, in a concurrency group of its
own, answered even while the actor works on a micro-batch). The environment variable is a
testing hook."""
PING_S = 10.0
"""An actor that does not answer that question within this long, twice in a row, is stopped
(its process killed): Ray restarts it and sends its calls again, or, where it may not be
restarted (``--handoff direct``), the scans stop in one line, resumable."""


class Scheduler:
    def __init__(self, pipelines: Pipelines, window: int, notice=None):
        self.pipelines = pipelines
        self.pipes, self.handoffs = pipelines.pipes, pipelines.handoffs
        self.window = window
        self.notice = notice or (lambda line: None)
        """Called with a line when replicas are lost (a node left) and the scans go on without them."""
        self.in_flight: deque[tuple[object, Sent]] = deque()  # (aggregator call, Sent), oldest first
        self.jobs: list[Job] = []
        self.turn = 0  # the job whose micro-batch goes next
        self.sent = 0  # micro-batches handed out, to deal them round robin over the live replicas
        self.answered = time.monotonic()  # when a call in flight last answered (or the first was sent)
        self.suspects: set = set()  # actors silent when last asked: restarted if silent again

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        if not self.pipelines.live:
            job.fail(self.all_lost())

    def run(self, jobs: list[Job], timings) -> None:
        """Scan ``jobs`` to their end (one-shot use); ``timings(job)`` is what each manifest records."""
        for job in jobs:
            self.add(job)
        while self.jobs:
            self.step(timings)

    def step(self, timings, wait_s: float | None = None) -> list[Job]:
        """One turn: fill the window, then land what answers first (the oldest call in flight or
        a scan's last call to its aggregator). Returns the jobs that ended in it: completed
        (``job.manifest``), failed (``job.error``) or cancelled. ``wait_s``: how long to wait
        for an answer (None: until one comes)."""
        self.fill()
        for job in self.jobs:
            if job.drained and job.finishing is None and job.state != FAILED:
                # completed: commit the rest and mark the run complete; cancelled: commit the rest
                job.finishing = job.sink.commit() if job.state == CANCELLED else job.sink.finish(timings(job))
        ended = [job for job in self.jobs if job.drained and job.state == FAILED]
        finishing = {job.finishing: job for job in self.jobs if job.finishing is not None}
        refs = ([self.in_flight[0][0]] if self.in_flight else []) + list(finishing)
        if refs:
            ready = self._wait(refs, wait_s)
            if ready:
                self.answered, self.suspects = time.monotonic(), set()
            if ready and ready[0] in finishing:
                job = finishing[ready[0]]
                if self._finished(job):
                    ended.append(job)
            elif ready:
                self.settle()
        ended += [job for job in self.jobs if job.drained and job.state == FAILED and job not in ended]
        for job in ended:
            self.jobs.remove(job)
        return ended

    def _wait(self, refs: list, wait_s: float | None) -> list:
        """The first of ``refs`` to answer within ``wait_s`` (None: however long it takes),
        checking meanwhile that the replicas' nodes are alive (`check_nodes`)."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            left = NODE_CHECK_S if deadline is None else min(NODE_CHECK_S, max(0.0, deadline - time.monotonic()))
            ready, _ = ray.wait(refs, num_returns=1, timeout=left)
            if ready or (deadline is not None and time.monotonic() >= deadline):
                return ready
            self.check_nodes()

    def check_nodes(self) -> None:
        """Drop the replicas on nodes that left the cluster; their micro-batches in flight fail
        and are sent again to the replicas left (`settle`). With none left, every scan fails.
        With the head or this machine's node gone, one line (`placement.check_cluster`; called
        here both when nothing answers and when a call failed, which may be the first sign)."""
        placement.check_cluster()
        if self.in_flight and time.monotonic() - self.answered >= STALL_S:
            self.restart_silent()
        if not self.pipelines.lost():
            return
        live = len(self.pipelines.live)
        if live:
            self.notice(
                f"{self.pipelines.lost_line()}: the scan goes on with the {live} replica{'s' if live > 1 else ''} left"
            )
            return
        for job in self.jobs:
            job.fail(self.all_lost())

    def restart_silent(self) -> None:
        """Ask the live stages and the aggregator hosts to answer at once; kill each that does
        not within ``PING_S`` twice in a row (its node alive, its process stopped), so that Ray
        restarts it and retries its calls. Twice: an actor that Ray is restarting (after a
        crash, or after this) answers only once its process has started again."""
        named, ranked = {}, set()  # ranked: the ranks of tensor-parallel stages, never restarted
        for r in self.pipelines.live:
            for s in range(len(self.pipes[r])):
                group = self.pipelines.group(self.pipes[r], s)
                for rank, actor in enumerate(group):
                    of = f"rank {rank} of " if len(group) > 1 else ""
                    named[actor] = f"{of}stage {s + 1}/{len(self.pipes[r])} of replica {r}"
                    if len(group) > 1:
                        ranked.add(actor)
        for i, host in enumerate({id(job.sink.host): job.sink.host for job in self.jobs}.values()):
            named[host] = f"aggregator host {i}"
        asked = {actor.memory.options(concurrency_group=placement.INFO).remote(): actor for actor in named}
        _, unanswered = ray.wait(list(asked), num_returns=len(asked), timeout=PING_S)
        silent = {asked[ref] for ref in unanswered}
        for actor in silent & self.suspects:
            ray.kill(actor, no_restart=False)
            done = (
                "stopped it (a rank of a tensor-parallel stage is not restarted)"
                if actor in ranked
                else "restarted it, its calls sent again"
            )
            self.notice(f"{named[actor]} answered nothing for {time.monotonic() - self.answered:.0f} s: {done}")
        self.suspects = silent - self.suspects
        if not self.suspects:
            self.answered = time.monotonic()

    def all_lost(self) -> UserError:
        return UserError(
            f"every replica is lost ({self.pipelines.lost_line()}); committed parts are kept: "
            "rerun the same command with --resume on the nodes that remain (see `ray status`)"
        )

    def fill(self) -> None:
        """Hand micro-batches to the pipelines until ``window`` are in flight, one from each
        running job in turn."""
        idle = 0
        while len(self.in_flight) < self.window and self.jobs and idle < len(self.jobs) and self.pipelines.live:
            job = self.jobs[self.turn % len(self.jobs)]
            self.turn += 1
            item = job.take()
            if item is None:
                idle += 1
                continue
            idle = 0
            self.submit(job, *item, self.next_pipe())

    def next_pipe(self) -> list:
        live = self.pipelines.live
        self.sent += 1
        return self.pipes[live[self.sent % len(live)]]

    def submit(self, job: Job, batch, group, pipe) -> None:
        batch_ref = ray.put(batch)
        hidden, rows = None, []
        if self.handoffs is None:
            for s in range(len(pipe)):
                # A tensor-parallel stage: every rank gets the micro-batch, in the same turn; rank 0
                # answers for the group (the others return None).
                turn = self.pipelines.next_turn(pipe, s)
                actors = self.pipelines.group(pipe, s)
                given = hidden if len(actors) == 1 else [hidden]  # the ranks read it in turn (Stage.forward)
                ranks = [rank.forward.options(num_returns=2).remote(batch_ref, given, turn) for rank in actors]
                hidden, stage_rows = ranks[0]
                rows.append(stage_rows)
        else:  # the rows through the object store, the hidden state handed over directly (workers.handoff)
            hops = self.handoffs[self.pipes.index(pipe)]
            for stage, hop in itertools.zip_longest(pipe, hops):
                rows.append(stage.scan.remote(batch_ref, hidden))
                if hop is not None:
                    key = (batch.job, batch.batch_id)
                    hidden = stage.handoff.options(concurrency_group=GROUP, tensor_transport=hop).remote(key)
        self._send(Sent(job, batch, group, pipe, rows))

    def _send(self, sent: Sent) -> None:
        if not self.in_flight:
            self.answered = time.monotonic()  # an idle spell is no silence
        sent.job.in_flight += 1
        self.in_flight.append((sent.job.sink.add(sent.group, *sent.rows), sent))

    def settle(self) -> None:
        """Land the oldest call in flight."""
        ref, sent = self.in_flight.popleft()
        job = sent.job
        job.in_flight -= 1
        try:
            n_prompts, n_tokens, incarnation, committed = call(ref)
        except PromptTooLarge as err:
            if job.state == FAILED:
                return
            if job.cfg.on_error == "stop":
                job.fail(err)
                return
            self._skip(err, sent)
            return
        except UserError as err:
            if self._resent(sent):
                return
            job.fail(err)
            return
        if job.state == FAILED:
            return
        job.landed(sent, n_prompts, n_tokens)
        for done in committed:
            job.uncommitted.pop(done, None)
        if incarnation != job.incarnation:
            self._restarted(job, incarnation)

    def _resent(self, sent: Sent) -> bool:
        """A micro-batch whose call failed because its replica was lost (a node left the
        cluster) goes to a replica that is left, if any; True when it was sent again.
        Nothing of it reached the aggregator, so nothing is committed twice."""
        self.check_nodes()
        live = self.pipelines.live
        replica = next((r for r, pipe in enumerate(self.pipes) if pipe is sent.pipe), None)  # None: placed again since
        if not live or replica in live or sent.job.state == FAILED:
            return False
        self.submit(sent.job, sent.batch, sent.group, self.next_pipe())
        return True

    def _finished(self, job: Job) -> bool:
        """The job's last aggregator call answered: True when the job has ended; False when the
        aggregator was restarted meanwhile, its lost micro-batches now sent again."""
        ref, job.finishing = job.finishing, None
        try:
            answer = call(ref)
        except UserError as err:
            job.fail(err)
            return True
        if job.state == CANCELLED:
            return True
        incarnation, manifest = answer
        if incarnation == job.incarnation or not job.uncommitted:
            job.manifest, job.state = manifest, COMPLETED
            return True
        self._restarted(job, incarnation)
        return False

    def _restarted(self, job: Job, incarnation: str) -> None:
        """The job's aggregator is new (first contact or a restart): send what it may have lost."""
        first = job.incarnation is None
        job.incarnation = incarnation
        if not first:
            for sent in list(job.uncommitted.values()):
                self._send(sent)

    def _skip(self, err: PromptTooLarge, sent: Sent) -> None:
        """--on-error skip: record the prompt as skipped and rerun the rest of its micro-batch."""
        job, batch, group = sent.job, sent.batch, sent.group
        keep = np.flatnonzero(batch.prompt_ids != err.prompt_id)
        skipped = [
            {"prompt_id": err.prompt_id, "id": t.prompt.id, "reason": str(err)}
            for t in group
            if t.prompt.prompt_id == err.prompt_id
        ]
        try:
            call(job.sink.skip(batch.batch_id, skipped, batch_done=len(keep) == 0))
        except UserError as error:
            job.fail(error)
            return
        job.prompts_done += 1
        if len(keep):
            self.submit(job, batch.take(keep, trim=True), [group[i] for i in keep], sent.pipe)


def call(ref):
    """``ray.get(ref)``, an actor that could not be restarted or a hand-off that timed out as one line."""
    try:
        return ray.get(ref)
    except RayActorError as err:
        placement.check_cluster()  # the actor went with the head, or with this machine's node: say that
        raise UserError(
            f"a pipeline actor died and could not be restarted ({placement.ray_reason(err)}); committed parts are "
            "kept: fix the cause, then rerun the same command with --resume"
        ) from None
    except TimeoutError as err:  # --handoff direct: a hidden state that never reached the next stage
        raise UserError(
            f"a stage-to-stage hand-off timed out ({placement.ray_reason(getattr(err, 'cause', err))}); committed "
            "parts are kept: "
            "rerun the same command with --resume (or with --handoff store)"
        ) from None
