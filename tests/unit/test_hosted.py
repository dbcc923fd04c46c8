"""aggregator.hosted: several scans' aggregators in one process, and that process restarted."""

from __future__ import annotations

import pyarrow.dataset as ds

from aggregator.aggregator import Aggregator
from aggregator.hosted import AggregatorHost, Target
from neuroscan.manifest import read_manifest
from tests.manifests import HEADER
from tests.unit.test_aggregator import _group, _stage_rows

TOKENS = [chr(i) for i in range(256)]
LENGTHS = [5, 3]


def _batch(batch_id: int):
    return _group([2 * batch_id, 2 * batch_id + 1], LENGTHS), _stage_rows(batch_id, 0, 3, LENGTHS)


def _rows(out) -> list[dict]:
    table = ds.dataset(out / "activations").to_table()
    return sorted(table.to_pylist(), key=lambda row: (row["layer"], row["prompt_id"], row["neuron"]))


def test_two_scans_in_one_host_write_what_their_own_aggregators_write(tmp_path):
    host = AggregatorHost(TOKENS)
    scans = {name: Target(name, str(tmp_path / name), rows) for name, rows in (("a", 10), ("b", 10**6))}
    for target in scans.values():
        (tmp_path / target.key).mkdir()
        host.open(target, HEADER)
    assert sorted(host.open_scans) == ["a", "b"]
    for batch_id in range(3):  # interleaved, as the scheduler sends them
        for target in scans.values():
            assert host.add(target, *_batch(batch_id))[:2] == (2, 8)
    for name, target in scans.items():
        (tmp_path / f"{name}-alone").mkdir()
        alone = Aggregator(str(tmp_path / f"{name}-alone"), HEADER, TOKENS, target.rows_per_part)
        for batch_id in range(3):
            alone.add(*_batch(batch_id))
        alone.finish({})
        manifest = host.finish(target, {})[1]
        assert manifest.status == "complete" and manifest.totals.prompts == 6
        assert len(manifest.parts) == (3 if name == "a" else 1)  # each scan keeps its own part size
        assert _rows(tmp_path / name) == _rows(tmp_path / f"{name}-alone")
        host.close(target)
    assert host.open_scans == {} and host.memory()["peak_rss_mb"] > 0


def test_a_restarted_host_opens_a_scan_again_from_its_manifest(tmp_path):
    """Ray restarts a crashed host with nothing open: the scan's next call opens it from the
    manifest, with a new incarnation, so the sender resends what was not committed."""
    target = Target("a", str(tmp_path / "a"), rows_per_part=10**6)  # parts only when committed
    (tmp_path / "a").mkdir()
    first = AggregatorHost(TOKENS)
    first.open(target, HEADER)
    incarnation = first.add(target, *_batch(0))[2]
    first.commit(target)
    first.add(target, *_batch(1))  # buffered, lost with the process
    restarted = AggregatorHost(TOKENS)
    duplicate = restarted.add(target, *_batch(0))
    assert duplicate[:2] == (0, 0) and duplicate[2] != incarnation and duplicate[3] == [0]
    restarted.add(target, *_batch(1))  # resent by the scheduler
    manifest = restarted.finish(target, {})[1]
    assert sorted(b for part in manifest.parts for b in part.batches) == [0, 1]
    assert manifest.totals.prompts == 4 and read_manifest(tmp_path / "a").resumed_at
