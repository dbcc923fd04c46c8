"""S stages x R replicas of one model, placed once and kept until closed.

`neuroscan scan` opens them for one scan; `neuroscan serve` opens them once and runs every
submitted scan through them. A stage holds no scan's settings: each micro-batch carries its
scan's selection, so scans with other thresholds share the same stages.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import ray

from cluster import placement
from workers.shard import ShardSpec
from workers.stage import Stage, StageSpec


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
    group: object = None
    collectives: list = field(default_factory=list)

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
    ) -> Pipelines:
        """Start (or join) Ray, place the stages and load their weights. ``extra_actors``: the
        aggregators that will share the cluster (a local Ray gets a logical CPU for each)."""
        stages, n_layers = len(bounds), bounds[-1][1]
        n_actors = stages * replicas
        self = cls(device=device)
        self.started_ray = placement.start_ray(n_actors + extra_actors)
        direct = handoff == "direct" and stages > 1
        try:
            self.group = placement.reserve(device, n_actors, gpus_per_stage)
            threads = max(1, (os.cpu_count() or 1) // n_actors) if device == "cpu" else 0
            for r in range(replicas):
                pipe = []
                for s, (start, stop) in enumerate(bounds):
                    spec = StageSpec(model_path, ShardSpec(start, stop, n_layers), device, dtype, threads, direct)
                    name = f"neuroscan-{self.run_id}-stage-{r}-{s}"
                    actor = placement.stage_actor(
                        Stage, self.group, r * stages + s, device, name, gpus_per_stage, direct
                    )
                    pipe.append(actor.remote(spec))
                self.pipes.append(pipe)
            ray.get([a.setup.remote() for a in self.actors])
            if direct:
                self.handoffs, self.collectives = placement.connect(self.pipes, device)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def actors(self) -> list:
        return [a for pipe in self.pipes for a in pipe]

    def memory(self) -> list[dict]:
        return ray.get([a.memory.options(concurrency_group=placement.INFO).remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.pipes = []
        placement.disconnect(self.collectives)
        if self.group is not None:
            placement.remove_placement_group(self.group)
            self.group = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
