"""``neuroscan bench --device cpu --preset tiny`` runs every mode (a smoke test: CPU numbers are not the record)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.cli import main
from neuroscan.config import BENCH_MODES, MODEL_PRESETS


def test_bench_smoke(ray_session, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--prompts",
        "12",
        "--prompt-tokens",
        "40",
        "--batch-tokens",
        "256",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["results"]) == list(BENCH_MODES)
    for mode, r in report["results"].items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and mode in printed
    assert report["results"]["bare"]["ratio_to_bare"] == 1.0 and report["complete"] is True
    # `bare` timed a second time, after the other in-process modes: the run's own noise.
    noise = abs(1 - report["results"]["bare_again"]["ratio_to_bare"])
    assert f"noise: bare timed twice differs by {noise:.1%}" in printed
    assert report["workload"]["tokens"] == 12 * 40
    # The point of the on-device reduction: far fewer bytes leave the device than activations.
    assert (
        report["results"]["scan_local"]["d2h_bytes_per_token"] < report["results"]["naive"]["d2h_bytes_per_token"] / 4
    )
    assert report["results"]["scan"]["aggregator_lag_s"] >= 0
    assert report["versions"]["torch"] and report["matmul_flops"] > 0
    # The reduction each in-process mode used (CPU: the eager reference everywhere).
    assert {r.get("reduction") for m, r in report["results"].items() if m.startswith("scan_local")} == {"eager"}


@pytest.mark.parametrize(
    "preset, skipped",
    [
        ("tiny-neox", {"bare_hf_gelu", "bare_hf_rotary"}),
        ("tiny-qwen2", {"bare_hf_gelu", "bare_hf_rotary"}),
        ("tiny-gpt2", {"bare_hf_rotary", "transformer_lens"}),
    ],
)
def test_bench_runs_every_family(ray_session, tmp_path, capsys, preset, skipped):
    """Each family's bench: every mode that measures something for it, the rest said skipped."""
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", preset, "--prompts", "6", "--prompt-tokens", "24", "--batch-tokens", "96"]
    assert main([*args, "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["architecture"] == MODEL_PRESETS[preset]["model_type"]
    assert set(report["skipped"]) == skipped
    assert list(report["results"]) == [m for m in BENCH_MODES if m not in skipped]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in report["results"].values())
    # Fewer bytes leave the device than the activations, even with every neuron of these narrow models kept.
    assert report["results"]["scan_local"]["d2h_bytes_per_token"] < report["results"]["naive"]["d2h_bytes_per_token"]
    capsys.readouterr()


def test_bench_refuses_an_unknown_mode(capsys):
    assert main(["bench", "--device", "cpu", "--modes", "bare,fast"]) == 2
    assert "--modes 'fast' is not known: use one of bare, " in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "gpu"], "--device 'gpu' is not known: use one of cpu, cuda"),
        (
            ["--preset", "gptj"],
            "--preset 'gptj' is not known: use one of tiny, tiny-neox, tiny-llama, tiny-qwen2, tiny-mistral, "
            "tiny-gpt2, gptj-6b, pythia-6.9b, llama-3-8b, gpt2-xl (or --model DIR)",
        ),
        (["--dtype", "half"], "--dtype 'half' is not known: use one of auto, float32, float16, bfloat16"),
        (["--prompts", "0"], "--prompts 0 must be at least 1"),
        (["--prompt-tokens", "0"], "--prompt-tokens 0 must be at least 1"),
        (["--batch-tokens", "0"], "--batch-tokens 0 must be at least 1"),
        (["--nodes", "-1"], "--nodes -1 must be at least 0"),
        (["--nodes", "2", "--service"], "--nodes and --service are two benchmarks: run one, then the other"),
        (
            ["--prompt-tokens", "5000"],
            "--prompt-tokens 5000 is more than the model's context of 2048: use at most 2048",
        ),
    ],
)
def test_bench_refuses_bad_flags_in_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "runs" / "bench.json"
    assert main(["bench", *flags, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"neuroscan: error: {message}\n"
    assert not out.exists()


def test_bench_refuses_a_directory_as_its_out(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"neuroscan: error: --out {tmp_path} is a directory: name the file to write, e.g. {tmp_path / 'bench.json'}\n"
    )


def test_a_bench_cut_short_keeps_the_modes_it_finished(tmp_path, monkeypatch):
    """The JSON is rewritten after every mode: a run that dies in the Ray modes (or times out)
    still leaves the in-process modes' figures, marked incomplete."""
    import bench.run
    from cluster.cli import build_parser, config_from
    from neuroscan.config import BenchConfig

    def dies(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(bench.run, "bench_ray", dies)
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        [
            "bench",
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--prompts",
            "4",
            "--prompt-tokens",
            "20",
            "--batch-tokens",
            "64",
            "--modes",
            "bare,scan_local,scan",
            "--out",
            str(out),
        ]
    )
    with pytest.raises(RuntimeError):
        bench.run.run_bench(config_from(BenchConfig, args))
    report = json.loads(out.read_text())
    assert report["complete"] is False and list(report["results"]) == ["bare", "scan_local"]
    assert report["results"]["scan_local"]["ratio_to_bare"] > 0


def test_aggregator_pace_diagnostic_writes_a_complete_run(tmp_path, monkeypatch, capsys):
    """`python -m bench.aggregate` (the aggregator alone, for RESULTS) on a small shape."""
    import sys

    import pyarrow.dataset as ds

    from bench import aggregate
    from neuroscan.manifest import read_manifest

    out = tmp_path / "agg"
    monkeypatch.setattr(
        sys,
        "argv",
        ["aggregate", str(out), "--batches", "3", "--prompts", "4", "--tokens", "16", "--layers", "2", "--kept", "5"],
    )
    aggregate.main()
    assert "3 micro-batches of 40 rows" in capsys.readouterr().out
    manifest = read_manifest(out).to_dict()
    assert manifest["status"] == "complete" and manifest["totals"]["activation_rows"] == 3 * 40
    assert ds.dataset(out / "activations").count_rows() == 3 * 40


def test_transformers_modules_put_back_and_restored():
    """The ``bare_hf_*`` modes and the peers run transformers' own GELU and attention; after, neuroscan's again."""
    from transformers import GPTJConfig
    from transformers.activations import NewGELUActivation
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    from bench.run import transformers_modules
    from workers.rotary import RotaryAttention
    from workers.shard import ShardSpec, StageModel, TanhGELU

    model = StageModel(GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=16), ShardSpec(0, 2, 2))
    with transformers_modules(model, ("gelu", "attention")):
        assert all(type(b.attn) is GPTJAttention and type(b.mlp.act) is NewGELUActivation for b in model.body.h)
    assert all(type(b.attn) is RotaryAttention and type(b.mlp.act) is TanhGELU for b in model.body.h)
    with transformers_modules(model, ("attention",)):
        assert all(type(b.attn) is GPTJAttention and type(b.mlp.act) is TanhGELU for b in model.body.h)


def test_the_service_bench_measures_what_it_says(ray_session, monkeypatch, tmp_path, capsys):
    """``neuroscan bench --service`` at a small size (the sizes of record are bench/service.py's)."""
    from bench import service

    monkeypatch.setattr(service, "LARGE", 24)
    monkeypatch.setattr(service, "SMALL", 8)
    monkeypatch.setattr(service, "SUBMISSIONS", 6)
    monkeypatch.setattr(service, "CLIENTS", 3)
    out = tmp_path / "service.json"
    assert main(["bench", "--service", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["service"]
    assert (
        report["submit_latency"]["n"] == 6
        and 0 < report["submit_latency"]["p50_ms"] <= report["submit_latency"]["p99_ms"]
    )
    assert report["many_vs_one"]["scans"] == 3 and report["many_vs_one"]["ratio"] > 0
    assert report["warm_vs_cold"]["warm_s"] > 0 and report["warm_vs_cold"]["cold_scan_prompts"] == 2
    assert report["small_behind_large"]["small_s"] > 0
    printed = capsys.readouterr().out
    assert "submit latency (6 submissions, 3 clients" in printed and "3 concurrent scans of 8 prompts" in printed


def test_the_nodes_bench_scans_on_clusters_of_one_and_two_nodes(tmp_path):
    """``neuroscan bench --nodes 2``: real 1- and 2-node Ray clusters on this machine, the scan's
    own tokens/s from each run's manifest. In a process of its own, as a user runs it: the
    clusters' shutdown resets the Ray state of the process that started them."""
    out = tmp_path / "nodes.json"
    flags = ["--nodes", "2", "--prompts", "16", "--prompt-tokens", "32", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", *flags], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["nodes"]["rows"]
    assert [(r["nodes"], r["replicas"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(r["startup_s"] > 0 and r["scan_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["ratio_to_one_node"] == 1.0
    assert "nodes  start-up s  scan s  tokens/s  vs 1 node" in done.stdout
