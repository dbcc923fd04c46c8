"""``neuroscan bench --service``: the scanning service measured, on one machine, in one run.

A service on the bench's model (1 stage; in this process, over a real HTTP server on a
loopback port) and four measurements:

  submit_latency   p50/p99 of 200 submissions (2-prompt scans) from 8 concurrent clients
                   while the service scans a large corpus (the submissions are cancelled)
  warm_vs_cold     from submit to a completed 2-prompt scan on the warm service, against a
                   cold ``neuroscan scan`` of the same 2 prompts (Ray, placement, weights)
  many_vs_one      tokens/s of 50 concurrent 40-prompt scans against one scan of the same
                   2,000 prompts (the target is >= 0.9x), and the padded tokens each way
                   (what the stages compute: how busy the many keep them)
  small_behind_large  how long a 2-prompt scan submitted behind a 2,000-prompt scan takes

Every scan is submitted with ``verify=0``: the fidelity check runs after a scan, on the
service's CPU, and is no part of what these measure.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.client import Client
from cluster.driver import plan, run_scan
from cluster.serve import background
from cluster.service import Service
from neuroscan.config import BenchConfig, ScanConfig, ServeConfig
from prompts.batching import PACKINGS, micro_batches
from prompts.generate import generate

TWO = ["apple, banana, cherry,", "2, 4, 6, 8,"]
LARGE, SMALL = 2000, 40
"""Prompts of the large scan, and of each of the many small scans that together make it."""
SUBMISSIONS, CLIENTS = 200, 8


def corpus(path: Path, n: int, seed: int) -> Path:
    rows = generate(n, families=["days", "months", "arithmetic", "countdown"], variants=["zero_shot", "icl"], seed=seed)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_service_bench(cfg: BenchConfig, model: str | None, dtype: str) -> dict:
    """The four measurements on ``model`` (None: the embedded one), in seconds and tokens/s."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = corpus(tmp / "big.jsonl", LARGE, seed=1)
        template = ScanConfig(prompts="seed", out=str(tmp), model=model, device=cfg.device, dtype=dtype)
        t0 = time.perf_counter()
        cold = run_scan(
            ScanConfig(
                prompts=str(_two(tmp)),
                out=str(tmp / "cold"),
                model=model,
                device=cfg.device,
                dtype=dtype,
                quiet=True,
                verify=0,  # as the service's scans, which the cold one is compared with
            )
        )
        cold_s = time.perf_counter() - t0
        service = Service(ServeConfig(results=str(tmp / "results"), port=0), template)
        service.start()
        url, stop = background(service, "127.0.0.1", 0)
        try:
            client = Client(url)
            out["warm_vs_cold"] = {
                "cold_s": cold_s,
                "warm_s": _time_scan(client, TWO, "warm"),
                "cold_scan_prompts": cold.totals.prompts,
            }
            out["submit_latency"] = _submit_latency(client, big)
            out["many_vs_one"] = _many_vs_one(client, big, model)
            out["small_behind_large"] = _small_behind_large(client, big)
        finally:
            stop()
            service.close()
    return out


def _two(tmp: Path) -> Path:
    path = tmp / "two.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TWO))
    return path


def _time_scan(client: Client, prompts, name: str) -> float:
    t0 = time.perf_counter()
    client.submit(prompts, name=name, verify=0).wait(poll_s=0.05)
    return time.perf_counter() - t0


def _submit_latency(client: Client, big: Path) -> dict:
    large = client.submit(str(big), name="latency-background", verify=0)
    while large.status()["state"] == "queued":
        time.sleep(0.05)
    times: list[float] = []
    ids: list[str] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        t0 = time.perf_counter()
        job = client.submit(TWO, name=f"latency-{i}", verify=0)
        with lock:
            times.append(time.perf_counter() - t0)
            ids.append(job.id)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(submit, range(SUBMISSIONS)))
    for scan_id in ids:
        client.job(scan_id).cancel()
    large.cancel()
    for scan_id in [*ids, large.id]:
        while client.job(scan_id).status()["state"] in ("queued", "running"):
            time.sleep(0.05)
    return {
        "n": len(times),
        "clients": CLIENTS,
        "p50_ms": 1e3 * percentile(times, 0.5),
        "p99_ms": 1e3 * percentile(times, 0.99),
        "mean_ms": 1e3 * statistics.fmean(times),
    }


def _many_vs_one(client: Client, big: Path, model: str | None) -> dict:
    rows = [json.loads(line) for line in big.read_text().splitlines()]
    t0 = time.perf_counter()
    client.submit(str(big), name="one", verify=0).wait(poll_s=0.1)
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jobs = [client.submit(rows[i : i + SMALL], name=f"many-{i // SMALL}", verify=0) for i in range(0, len(rows), SMALL)]
    for job in jobs:
        job.wait(poll_s=0.1)
    many_s = time.perf_counter() - t0
    one_padded = padded_tokens(big, model)
    many_padded = 0
    for i in range(0, len(rows), SMALL):
        part = big.with_name(f"many-{i}.jsonl")
        part.write_text("".join(json.dumps(row) + "\n" for row in rows[i : i + SMALL]))
        many_padded += padded_tokens(part, model)
    return {
        "one_s": one_s,
        "many_s": many_s,
        "scans": len(jobs),
        "prompts": len(rows),
        "ratio": one_s / many_s,
        "padded_tokens_one": one_padded,
        "padded_tokens_many": many_padded,
        "padded_rate_ratio": (many_padded / many_s) / (one_padded / one_s),
    }


def padded_tokens(path: Path, model: str | None, packing: str = PACKINGS[0]) -> int:
    """Tokens the stages compute for a scan of ``path`` (its micro-batches' rows x width) when
    its prompts are packed by ``packing``."""
    cfg = ScanConfig(prompts=str(path), out=str(path.with_suffix(".out")), model=model)
    p = plan(cfg)
    batches = micro_batches(cfg.prompts, p.tokenizer, p.context, cfg.batch_tokens, cfg.truncate, packing=packing)
    return sum(batch.input_ids.size for batch, _ in batches)


def _small_behind_large(client: Client, big: Path) -> dict:
    t0 = time.perf_counter()
    large = client.submit(str(big), name="large", verify=0)
    time.sleep(1.0)
    small_s = _time_scan(client, TWO, "small-behind")
    large.wait(poll_s=0.1)
    return {"small_s": small_s, "large_s": time.perf_counter() - t0}


def table(report: dict) -> str:
    w, s, m, b = (report[k] for k in ("warm_vs_cold", "submit_latency", "many_vs_one", "small_behind_large"))
    return "\n".join(
        [
            f"submit latency ({s['n']} submissions, {s['clients']} clients, while scanning): "
            f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms",
            f"2-prompt scan: warm service {w['warm_s']:.2f} s, cold `neuroscan scan` {w['cold_s']:.2f} s",
            f"{m['scans']} concurrent scans of {m['prompts'] // m['scans']} prompts {m['many_s']:.1f} s vs one scan of "
            f"{m['prompts']:,} {m['one_s']:.1f} s: "
            f"{m['ratio']:.2f}x its throughput ({m['padded_tokens_many']:,} padded tokens against "
            f"{m['padded_tokens_one']:,}: {m['padded_rate_ratio']:.2f}x its padded tokens/s)",
            f"2-prompt scan behind a {m['prompts']:,}-prompt scan: {b['small_s']:.2f} s (the large one: {b['large_s']:.1f} s)",
        ]
    )
