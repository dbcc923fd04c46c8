"""Many scans' aggregators in one process.

A service runs many scans at once. A process per scan's aggregator costs about 0.4 GB and
seconds to start, so a few long-lived `AggregatorHost` processes each hold the `Aggregator`
of several scans, one per `Target` (the scan's key, output directory and part size), and
share one pool of writing threads. Calls for one scan run in the order they were sent.

A host that Ray restarted after a crash holds no scan: the first call for a scan opens its
aggregator again from the manifest in the scan's output directory (written when the scan
was opened), which keeps the committed parts and reports a new incarnation, so the sender
sends again what was not committed: the same recovery as a scan's own aggregator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aggregator.aggregator import Aggregator, write_pool
from neuroscan.errors import UserError
from neuroscan.manifest import Manifest, read_manifest
from neuroscan.memory import MemoryWatch


@dataclass(frozen=True)
class Target:
    """Which scan a call is for, and what it takes to open its aggregator again."""

    key: str
    out: str
    rows_per_part: int


class AggregatorHost:
    def __init__(self, token_strings: list[str]):
        """``token_strings``: the readable text of every token id of the model every scan here runs on."""
        self.token_strings = token_strings
        self.pool = write_pool()
        self.watch = MemoryWatch()
        self.open_scans: dict[str, Aggregator] = {}

    def open(self, target: Target, header: Manifest) -> None:
        """Start (or continue, when ``target.out`` holds a manifest) the scan's aggregator."""
        self.close(target)
        self.open_scans[target.key] = Aggregator(
            target.out, header, self.token_strings, target.rows_per_part, self.pool
        )

    def _aggregator(self, target: Target) -> Aggregator:
        found = self.open_scans.get(target.key)
        if found is None:  # restarted since the scan was opened
            manifest = read_manifest(Path(target.out))
            if manifest is None:
                raise UserError(
                    f"{target.out} has no manifest.json although its scan was started: "
                    "start the scan again (--overwrite)"
                )
            found = self.open_scans[target.key] = Aggregator(
                target.out, manifest, self.token_strings, target.rows_per_part, self.pool
            )
        return found

    def add(self, target: Target, group: list, *stages) -> tuple[int, int, str, list[int]]:
        return self._aggregator(target).add(group, *stages)

    def skip(self, target: Target, batch_id: int, skipped: list[dict], batch_done: bool) -> None:
        self._aggregator(target).skip(batch_id, skipped, batch_done)

    def commit(self, target: Target) -> None:
        self._aggregator(target).commit()

    def finish(self, target: Target, timings: dict) -> tuple[str, Manifest]:
        return self._aggregator(target).finish(timings)

    def memory(self) -> dict[str, float]:
        """This process's memory: the peak over every sample its scans' aggregators took
        (safe to call while another thread runs a scan's call)."""
        reports = [self.watch.report(), *(found.memory() for found in list(self.open_scans.values()))]
        return max(reports, key=lambda report: report["peak_anon_mb"])

    def close(self, target: Target) -> None:
        """Forget the scan (ended, or its service is stopping); its output directory stays."""
        found = self.open_scans.pop(target.key, None)
        if found is not None:
            found.close()
