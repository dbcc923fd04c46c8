"""The aggregator processes: a few `aggregator.hosted.AggregatorHost` actors on the driver's
node, each holding the aggregators of several scans, started once (for a service, once for
all its scans) so that a new scan starts without starting a process.

`Aggregators.open` gives each new scan the host that holds the fewest scans, and returns the
scan's `Sink`: its calls to that host, each returning Ray's reference to the answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import ray

from aggregator.hosted import AggregatorHost, Target
from cluster import placement
from neuroscan.manifest import Manifest


@dataclass
class Sink:
    """One scan's aggregator: calls to its host, each returning an ObjectRef."""

    host: object
    target: Target

    def add(self, group: list, *rows):
        return self.host.add.remote(self.target, group, *rows)

    def skip(self, batch_id: int, skipped: list[dict], batch_done: bool):
        return self.host.skip.remote(self.target, batch_id, skipped, batch_done)

    def commit(self):
        return self.host.commit.remote(self.target)

    def finish(self, timings: dict):
        return self.host.finish.remote(self.target, timings)

    def memory(self):
        """The host process's memory (answered at once, not behind the calls queued on it)."""
        return self.host.memory.options(concurrency_group=placement.INFO).remote()


class Aggregators:
    def __init__(self, n: int, token_strings: list[str], name: str):
        """Start ``n`` hosts named ``name-0``... for a model whose tokens read ``token_strings``."""
        self.hosts = [placement.aggregator_actor(AggregatorHost, f"{name}-{i}").remote(token_strings) for i in range(n)]
        self.held: dict[str, tuple[object, Target]] = {}
        self.lock = threading.Lock()  # a service opens scans on one thread and releases them on another
        try:
            ray.get([host.__ray_ready__.remote() for host in self.hosts])
        except BaseException:
            self.close()
            raise

    def open(self, key: str, out: str, header: Manifest, rows_per_part: int) -> Sink:
        """The scan's aggregator, ready, on the host that holds the fewest scans."""
        target = Target(key, out, rows_per_part)
        with self.lock:
            load = {id(h): 0 for h in self.hosts}
            for host, _ in self.held.values():
                load[id(host)] += 1
            host = min(self.hosts, key=lambda h: load[id(h)])
            self.held[key] = (host, target)
        try:
            ray.get(host.open.remote(target, header))
        except BaseException:
            self.release(key)
            raise
        return Sink(host, target)

    def release(self, key: str, timeout_s: float = 10.0) -> None:
        """Forget a scan that ended: its host frees what it held, and is waited for up to
        ``timeout_s`` (a part it still writes lands before the scan is seen ended)."""
        with self.lock:
            held = self.held.pop(key, None)
        if held is not None:
            host, target = held
            ray.wait([host.close.remote(target)], timeout=timeout_s)

    def close(self) -> None:
        if placement.head_answers():  # where the head is gone, so are the hosts (on the driver's node)
            for host in self.hosts:
                ray.kill(host)
        self.hosts, self.held = [], {}
