"""``neuroscan bench --device cpu --preset tiny`` runs every mode (a smoke test: CPU numbers are not the record)."""

from __future__ import annotations

import json

from cluster.cli import main


def test_bench_smoke(ray_session, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--preset", "tiny", "--prompts", "12", "--prompt-tokens", "40", "--batch-tokens", "256", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"bare", "naive", "scan_local", "scan", "scan_2stage"}
    for mode, r in report["results"].items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and mode in printed
    assert report["results"]["bare"]["ratio_to_bare"] == 1.0
    assert report["workload"]["tokens"] == 12 * 40
    # The point of the on-device reduction: far fewer bytes leave the device than activations.
    assert report["results"]["scan_local"]["d2h_bytes_per_token"] < report["results"]["naive"]["d2h_bytes_per_token"] / 4
    assert report["results"]["scan"]["aggregator_lag_s"] >= 0
    assert report["versions"]["torch"] and report["matmul_flops"] > 0
