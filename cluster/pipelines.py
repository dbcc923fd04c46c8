"""S stages x R replicas of one model, placed once and kept until closed.

`neuroscan scan` opens them for one scan; `neuroscan serve` opens them once and runs every
submitted scan through them. A stage holds no scan's settings: each micro-batch carries its
scan's selection, so scans with other thresholds share the same stages.
"""

from __future__ import annotations

import dataclasses
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
    specs: list[StageSpec] = field(default_factory=list)
    """What each stage loads (the same for every replica)."""
    gpus_per_stage: float = 1.0
    replacing: dict[int, Replacement] = field(default_factory=dict)
    """Dropped replicas whose stages `regrow` is loading again."""
    generation: int = 0
    """Replicas placed again so far: in the new actors' names, which must be new."""
    stuck: dict[int, set[str]] = field(default_factory=dict)
    """Dropped replicas that failed to load again, with the nodes they tried: not tried there again."""
    ranks: int = 1
    """Actors a stage is (``--tensor-parallel``): ``pipes[r][s]`` is rank 0, ``peers[r][s]`` the others."""
    peers: list[list[list]] = field(default_factory=list)
    turns: dict[tuple[int, int], int] = field(default_factory=dict)
    """Micro-batches sent so far to each (replica, stage) group of ranks: the next one's ``turn``."""

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
        ranks: int = 1,
    ) -> Pipelines:
        """Start (or join) Ray, place the stages and load their weights. ``extra_actors``: the
        aggregators that will share the cluster (a local Ray gets a logical CPU for each).
        ``say`` is told each step as it starts and ends (Ray started, each stage loaded), so
        that loading a large model is not silent. ``ranks``: the actors of each stage, which
        form a tensor-parallel group (`workers.autotp`)."""
        stages, n_layers = len(bounds), bounds[-1][1]
        n_actors = stages * replicas * ranks
        self = cls(device=device, ranks=ranks)
        joined, address, t0 = ray.is_initialized(), os.environ.get("RAY_ADDRESS"), time.perf_counter()
        if not joined:
            say(f"joining the Ray cluster at RAY_ADDRESS={address} ..." if address else "starting a local Ray ...")
        self.started_ray = placement.start_ray(n_actors + extra_actors)
        if not joined:
            say(f"Ray {'cluster joined' if address else 'started'} ({time.perf_counter() - t0:.1f} s)")
        direct = handoff == "direct" and stages > 1
        try:
            of_ranks = f" of {ranks} ranks" if ranks > 1 else ""
            say(
                f"loading {stages} stage{'s' * (stages > 1)}{of_ranks} x {replicas} replica{'s' * (replicas > 1)} "
                f"({n_layers} layers, {device}) ..."
            )
            self.reserved = placement.reserve(device, stages, replicas, gpus_per_stage, ranks)
            placement.check_nodes(self.reserved, model_path)
            threads = max(1, (os.cpu_count() or 1) // n_actors) if device == "cpu" else 0
            self.gpus_per_stage = gpus_per_stage
            self.specs = [
                StageSpec(model_path, ShardSpec(start, stop, n_layers), device, dtype, threads, direct)
                for start, stop in bounds
            ]
            for r in range(replicas):
                pipe, peers = self._replica(r)
                self.pipes.append(pipe)
                self.peers.append(peers)
            self._load(self._setups(), bounds, say)
            if direct:
                hops, self.collectives = placement.connect([self.pipes[r] for r in self.live], device)
                self.handoffs = [[] for _ in self.pipes]  # a dropped replica's stay empty: it gets no micro-batch
                for r, replica_hops in zip(self.live, hops, strict=True):
                    self.handoffs[r] = replica_hops
        except BaseException:
            self.close()
            raise
        return self

    def _replica(self, r: int, generation: int = 0) -> tuple[list, list[list]]:
        """Start the stage actors of replica ``r`` in its bundles (``generation``: how many
        times it was placed before, in the names of the new actors): each stage's rank 0, and
        its other ranks."""
        pipe, peers = [], []
        for s, spec in enumerate(self.specs):
            name = f"neuroscan-{self.run_id}-stage-{r}-{s}" + (f"-{generation}" if generation else "")
            group = []
            for rank in range(self.ranks):
                actor = placement.stage_actor(
                    Stage,
                    self.reserved.group,
                    self.reserved.bundle(r, s),
                    self.device,
                    name + (f"-rank-{rank}" if self.ranks > 1 else ""),
                    self.gpus_per_stage,
                    spec.keep_hidden,
                    ranked=self.ranks > 1,
                )
                group.append(actor.remote(dataclasses.replace(spec, ranks=self.ranks, rank=rank)))
            pipe.append(group[0])
            peers.append(group[1:])
        return pipe, peers

    def _setups(self) -> list[list]:
        """Every stage's set-up calls, replica by replica, stage by stage: one a rank, the ranks
        of a stage meeting where its rank 0 listens."""
        groups = [(first, *others) for pipe, peers in zip(self.pipes, self.peers) for first, others in zip(pipe, peers)]
        # every rank 0 asked at once: each answers once its process has started
        addresses = ray.get([g[0].rendezvous.remote() for g in groups]) if self.ranks > 1 else [None] * len(groups)
        return [[actor.setup.remote(address) for actor in group] for group, address in zip(groups, addresses)]

    def group(self, pipe: list, s: int) -> list:
        """Every rank of stage ``s`` of the replica ``pipe``, rank 0 first."""
        return [pipe[s], *self.peers[self.pipes.index(pipe)][s]] if self.ranks > 1 else [pipe[s]]

    def next_turn(self, pipe: list, s: int) -> int | None:
        """The ``turn`` of the next micro-batch sent to stage ``s`` of ``pipe``'s ranks (None
        for a stage of one rank)."""
        if self.ranks == 1:
            return None
        key = (self.pipes.index(pipe), s)
        self.turns[key] = self.turns.get(key, -1) + 1
        return self.turns[key]

    def regrow(self, say: Callable[[str], None]) -> None:
        """Place again the replicas dropped with a lost node, once Ray has placed their bundles
        again on nodes that are alive (a node that joined the cluster, or one with room): their
        stages load beside the scans, and the replica takes micro-batches once all have loaded.
        ``say`` is told each replica back. Asked between the service's steps; a one-shot scan
        goes on with the replicas it has. (Not with direct hand-offs: a new actor is outside
        its pipeline's collective group; nor with tensor-parallel stages, for the same reason.)"""
        if not self.dropped or self.handoffs is not None or self.ranks > 1 or not placement.head_answers():
            return
        alive = placement.alive_nodes()
        placed = placement.bundle_nodes(self.reserved.group)
        for r in self.dropped:
            bundles = [self.reserved.bundle(r, s) for s in range(len(self.specs))]
            nodes = {placed.get(b) for b in bundles}
            if r in self.replacing or not nodes <= alive or nodes <= self.stuck.get(r, set()):
                continue
            self.reserved.bundle_nodes.update({b: placed[b] for b in bundles})
            self.generation += 1
            actors, _ = self._replica(r, self.generation)
            self.replacing[r] = Replacement(actors, [a.setup.remote() for a in actors], time.perf_counter())
        for r, new in list(self.replacing.items()):
            ready, _ = ray.wait(new.calls, num_returns=len(new.calls), timeout=0)
            there = self.reserved.nodes(r) <= alive
            if len(ready) == len(new.calls) or not there:
                del self.replacing[r]
                self._replaced(r, new, there, say)

    def _replaced(self, r: int, new: Replacement, there: bool, say: Callable[[str], None]) -> None:
        """Replica ``r``'s new stages have loaded (or failed, or lost their node): put it back."""
        nodes = self.reserved.nodes(r)
        try:
            ray.get(new.calls if there else [])
        except Exception as err:  # the model missing on that node, say
            self.stuck[r] = nodes
            say(
                f"replica {r} could not load again on node {_short(nodes)} ({placement.ray_reason(err)}): "
                "not tried there again"
            )
            there = False
        if not there:
            for actor in new.actors:
                ray.kill(actor, no_restart=True)
            return
        self.pipes[r] = new.actors
        del self.dropped[r]
        live = len(self.live)
        say(
            f"replica {r} is back, on node {_short(nodes)} (loaded in {time.perf_counter() - new.t0:.1f} s): "
            f"{live} replica{'s' * (live > 1)} live"
        )

    def _load(
        self,
        calls: list[list],
        bounds: list[tuple[int, int]],
        say: Callable[[str], None],
        notice: Callable[[str], None] = tell,
    ) -> None:
        """Wait for every stage to load its weights (``calls``: replica by replica, stage by
        stage, the set-up call of each of its ranks), telling ``say`` of each as it finishes,
        in the order they finish. A node that leaves the cluster meanwhile takes its replicas:
        ``notice`` is told, and the others go on (as when a node leaves mid-scan); with none
        left, the start stops in one line."""
        stages, replicas, t0 = len(bounds), len(calls) // len(bounds), time.perf_counter()
        index = {ref: i for i, refs in enumerate(calls) for ref in refs}
        left = [len(refs) for refs in calls]
        pending = list(index)
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
                left[index[ref]] -= 1
                if left[index[ref]]:
                    continue  # other ranks of the stage still loading
                r, s = divmod(index[ref], stages)
                start, stop = bounds[s]
                of = f" of replica {r + 1}/{replicas}" if replicas > 1 else ""
                say(f"stage {s + 1}/{stages}{of} loaded (layers {start}-{stop - 1}, {time.perf_counter() - t0:.1f} s)")

    def lost(self) -> list[int]:
        """Drop (and kill) the live replicas with a stage on a node that is no longer alive;
        returns them. Their calls in flight then fail at once, instead of waiting for a restart
        that has no node to run on. With the head or this machine's node gone, one line."""
        placement.check_cluster()
        alive = placement.alive_nodes()
        gone = [r for r in self.live if not self.reserved.nodes(r) <= alive]
        for r in gone:
            self.dropped[r] = sorted(self.reserved.nodes(r) - alive)
            for actor in self.replica_actors(r):
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
        return [a for r in range(len(self.pipes)) for a in self.replica_actors(r)]

    def replica_actors(self, r: int) -> list:
        """Every actor of replica ``r``: each stage's ranks."""
        return [*self.pipes[r], *(a for peers in self.peers[r] for a in peers)] if self.peers else list(self.pipes[r])

    def memory(self, timeout_s: float = 10.0) -> list[dict | None]:
        """What each stage of the live replicas holds; None for one that does not answer
        within ``timeout_s`` (a stopped process: the manifest is written without it)."""
        live = [a for r in self.live for a in self.replica_actors(r)]
        return answers([a.memory.options(concurrency_group=placement.INFO).remote() for a in live], timeout_s)

    def close(self) -> None:
        """Kill the actors and free their placement group (where the head is gone, there is
        nothing left to free, and each call would wait on it)."""
        if placement.head_answers():
            for actor in [*self.actors, *(a for new in self.replacing.values() for a in new.actors)]:
                ray.kill(actor)
            placement.disconnect(self.collectives)
            if self.reserved is not None:
                placement.remove_placement_group(self.reserved.group)
        self.pipes, self.peers, self.reserved, self.replacing = [], [], None, {}
        if self.started_ray:
            placement.stop_ray()
            self.started_ray = False


@dataclass
class Replacement:
    """A dropped replica's stages, loading again."""

    actors: list
    calls: list
    t0: float


def _short(nodes: set[str]) -> str:
    return ", ".join(sorted(n[:8] for n in nodes))


def _loaded(refs: list) -> bool:
    """Whether the calls of ``refs`` (answered already) succeeded."""
    try:
        ray.get(refs)
    except Exception:
        return False
    return True


def answers(refs: list, timeout_s: float) -> list:
    """What each of ``refs`` answers within ``timeout_s`` in all, None for each that does not
    (or failed)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref) if ref in done else None)
        except Exception:
            out.append(None)
    return out
