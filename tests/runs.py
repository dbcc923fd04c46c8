"""Small finished scans built by the aggregator itself (no model, no Ray), for tests of what
reads a scan's directory."""

from __future__ import annotations

from pathlib import Path

from aggregator.aggregator import Aggregator
from tests.manifests import HEADER
from tests.unit.test_aggregator import _group, _stage_rows

LENGTHS = [5, 3]


def finished_run(out: Path, batches: int = 4, rows_per_part: int = 12) -> Path:
    """A complete scan in ``out``: ``batches`` micro-batches of two prompts over three layers,
    a part every ``rows_per_part`` activation rows."""
    out.mkdir(parents=True, exist_ok=True)
    agg = Aggregator(str(out), HEADER, [chr(i) for i in range(256)], rows_per_part)
    for b in range(batches):
        ids = [2 * b, 2 * b + 1]
        agg.add(_group(ids, LENGTHS), _stage_rows(b, 0, 2, LENGTHS, last=False), _stage_rows(b, 2, 1, LENGTHS))
    agg.finish({"seconds": 1.0})
    agg.close()
    return out
