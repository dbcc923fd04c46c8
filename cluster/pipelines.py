"""S stages x R replicas of one model, placed once and kept until closed.

`neuroscan scan` opens them for one scan; `neuroscan serve` opens them once and runs every
submitted scan through them. A stage holds no scan's settings: each micro-batch carries its
scan's selection, so scans with other thresholds share the same stages.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cluster import placement
from neuroscan.errors import UserError, tell
from workers.shard import ShardSpec
from workers.stage import Stage, StageSpec

NODE_CHECK_S = 2.0
"""While waiting on the stages, how often to ask Ray which nodes are alive: an actor on a node
that left is not failed by Ray while its placement group waits for room to restart it."""


@dataclass
class Pipelines:
    """The placed stage actors: ``pipes[r][s]`` is stage s of replica r."""

    device: str
    pipes: list[list] = field(default_factory=list)
    handoffs: list[list[str]] | None = None
    """Per replica, the Ray Direct Transport from each stage to the next; None: the object store."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    """In every actor's name: `ray list actors` shows what they serve."""
    started_ray: bool = False
    reserved: placement.Reserved | None = None
    collectives: list = field(default_factory=list)
    dropped: dict[int, list[str]] = field(default_factory=dict)
    """Each replica dropped because a node it ran on left the cluster (`lost`), with those nodes' ids."""

    @classmethod
    def open(
        cls,
        model_path: str,
        bounds: list[tuple[int, int]],
        device: str,
        dtype: str,
        replicas: int,
        gpus_per_stage: float = 1.0,
        handoff: str = "store",
        extra_actors: int = 1,
        say: Callable[[str], None] = lambda line: None,
    ) -> Pipelines:
        """Start (or join) Ray, place the stages and load their weights. ``extra_actors``: the
        aggregators that will share the cluster (a local Ray gets a logical CPU for each).
        ``say`` is told each step as it starts and ends (Ray started, each stage loaded), so
        that loading a large model is not silent."""
        stages, n_layers = len(bounds), bounds[-1][1]
        n_actors = stages * replicas
        self = cls(device=device)
        joined, address, t0 = ray.is_initialized(), os.environ.get("RAY_ADDRESS"), time.perf_counter()
        if not joined:
            say(f"joining the Ray cluster at RAY_ADDRESS={address} ..." if address else "starting a local Ray ...")
        self.started_ray = placement.start_ray(n_actors + extra_actors)
        if not joined:
            say(f"Ray {'cluster joined' if address else 'started'} ({time.perf_counter() - t0:.1f} s)")
        direct = handoff == "direct" and stages > 1
        try:
            say(
                f"loading {stages} stage{'s' * (stages > 1)} x {replicas} replica{'s' * (replicas > 1)} "
                f"({n_layers} layers, {device}) ..."
            )
            self.reserved = placement.reserve(device, stages, replicas, gpus_per_stage)
            placement.check_nodes(self.reserved, model_path)
            threads = max(1, (os.cpu_count() or 1) // n_actors) if device == "cpu" else 0
            for r in range(replicas):
                pipe = []
                for s, (start, stop) in enumerate(bounds):
                    spec = StageSpec(model_path, ShardSpec(start, stop, n_layers), device, dtype, threads, direct)
                    name = f"neuroscan-{self.run_id}-stage-{r}-{s}"
                    actor = placement.stage_actor(
                        Stage, self.reserved.group, self.reserved.bundle(r, s), device, name, gpus_per_stage, direct
                    )
                    pipe.append(actor.remote(spec))
                self.pipes.append(pipe)
            self._load([a.setup.remote() for a in self.actors], bounds, say)
            if direct:
                hops, self.collectives = placement.connect([self.pipes[r] for r in self.live], device)
                self.handoffs = [[] for _ in self.pipes]  # a dropped replica's stay empty: it gets no micro-batch
                for r, replica_hops in zip(self.live, hops, strict=True):
                    self.handoffs[r] = replica_hops
        except BaseException:
            self.close()
            raise
        return self

    def _load(
        self,
        calls: list,
        bounds: list[tuple[int, int]],
        say: Callable[[str], None],
        notice: Callable[[str], None] = tell,
    ) -> None:
        """Wait for every stage to load its weights (``calls``: replica by replica, stage by
        stage), telling ``say`` of each as it finishes, in the order they finish. A node that
        leaves the cluster meanwhile takes its replicas: ``notice`` is told, and the others go
        on (as when a node leaves mid-scan); with none left, the start stops in one line."""
        stages, replicas, t0 = len(bounds), len(calls) // len(bounds), time.perf_counter()
        index = {ref: i for i, ref in enumerate(calls)}
        pending = calls
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=NODE_CHECK_S)
            if (not ready or not _loaded(ready)) and self.lost():
                if not self.live:
                    raise UserError(
                        f"a node left the Ray cluster while the stages were loading the model ({self.lost_line()}): "
                        "nothing was scanned; run the command again on the nodes that remain (see `ray status`)"
                    )
                live = len(self.live)
                notice(
                    f"{self.lost_line()} while loading: the scan goes on with the {live} replica{'s' * (live > 1)} left"
                )
                pending = [ref for ref in pending if index[ref] // stages in self.live]
            ready = [ref for ref in ready if index[ref] // stages in self.live]
            ray.get(ready)  # a stage that failed to load, on a node still there, stops the start now
            for ref in ready:
                r, s = divmod(index[ref], stages)
                start, stop = bounds[s]
                of = f" of replica {r + 1}/{replicas}" if replicas > 1 else ""
                say(f"stage {s + 1}/{stages}{of} loaded (layers {start}-{stop - 1}, {time.perf_counter() - t0:.1f} s)")

    def lost(self) -> list[int]:
        """Drop (and kill) the live replicas with a stage on a node that is no longer alive;
        returns them. Their calls in flight then fail at once, instead of waiting for a restart
        that has no node to run on."""
        alive = placement.alive_nodes()
        gone = [r for r in self.live if not self.reserved.nodes(r) <= alive]
        for r in gone:
            self.dropped[r] = sorted(self.reserved.nodes(r) - alive)
            for actor in self.pipes[r]:
                ray.kill(actor, no_restart=True)
        return gone

    def lost_line(self) -> str:
        """Which replicas were dropped, and the nodes that took them."""
        nodes = sorted({n[:8] for ids in self.dropped.values() for n in ids})
        return (
            f"replica{'s' if len(self.dropped) > 1 else ''} {', '.join(map(str, sorted(self.dropped)))} lost "
            f"with node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}"
        )

    @property
    def live(self) -> list[int]:
        """The replicas in use: all but those `lost` dropped."""
        return [r for r in range(len(self.pipes)) if r not in self.dropped]

    def nodes(self) -> list[str]:
        """The Ray node ids the live replicas run on."""
        return sorted({n for r in self.live for n in self.reserved.nodes(r)}) if self.reserved else []

    @property
    def actors(self) -> list:
        return [a for pipe in self.pipes for a in pipe]

    def memory(self) -> list[dict]:
        """What each stage of the live replicas holds."""
        live = [a for r in self.live for a in self.pipes[r]]
        return ray.get([a.memory.options(concurrency_group=placement.INFO).remote() for a in live])

    def close(self) -> None:
        """Kill the actors and free their placement group (where the head is gone, there is
        nothing left to free, and each call would wait on it)."""
        if placement.head_answers():
            for actor in self.actors:
                ray.kill(actor)
            placement.disconnect(self.collectives)
            if self.reserved is not None:
                placement.remove_placement_group(self.reserved.group)
        self.pipes, self.reserved = [], None
        if self.started_ray:
            placement.stop_ray()
            self.started_ray = False


def _loaded(refs: list) -> bool:
    """Whether the calls of ``refs`` (answered already) succeeded."""
    try:
        ray.get(refs)
    except Exception:
        return False
    return True
