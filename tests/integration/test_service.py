"""``neuroscan serve`` end to end: a real HTTP server on a loopback port, the real scheduler on
resident pipelines (local Ray), a real SQLite file, the Python client and the CLI.

Every scan submitted to the service is compared with the one-shot ``neuroscan scan`` of the
same corpus and options (tables and manifest counts), and with a plain per-prompt forward pass.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection, ServeConfig
from neuroscan.errors import UserError
from neuroscan.manifest import read_manifest
from prompts.generate import generate, write_jsonl
from tests.conftest import CORPUS, fill
from tests.reference import assert_scan_matches, reference_scan
from tests.same_output import assert_same_output, sequence_corpus

TOKEN = "s3cret-token"
TEXTS = [row["text"] for row in CORPUS]
OPTION_SETS = [
    {},
    {"high": 1.0, "low": -0.05, "max_per_layer": 7},
    {"high": 0.5, "low": -0.1, "red": 0.8, "max_per_layer": 0, "top_k": 3},
    {"high": 2.0, "low": -0.02, "batch_tokens": 120, "format": "arrow"},
]


def selection(options: dict) -> Selection:
    return Selection(**{k: v for k, v in options.items() if k in ("high", "low", "red", "max_per_layer")})


@pytest.fixture(scope="module")
def served(ray_session, other_model, tmp_path_factory):
    """A service on 2 stages x 2 replicas of the second tiny model, on a free loopback port,
    with a token, a corpus root and a 1 MiB body limit; yields (client, service, root)."""
    from cluster.serve import background
    from cluster.service import Service

    root = tmp_path_factory.mktemp("service")
    (root / "corpora").mkdir()
    cfg = ServeConfig(results=str(root / "results"), port=0, corpus_root=str(root / "corpora"), max_body_mb=1)
    template = ScanConfig(prompts="seed", out=str(root), model=str(other_model), stages=2, replicas=2)
    service = Service(cfg, template)
    service.start()
    url, stop = background(service, "127.0.0.1", 0, TOKEN)
    yield Client(url, token=TOKEN), service, root
    stop()
    service.close()


@pytest.fixture
def served_on_a_small_disk(ray_session, other_model, tmpfs):
    """A service on 1 stage x 1 replica of the second tiny model whose --results (and so its
    state directory: the table and the stored corpora) is a real tmpfs of 512 KiB; yields
    (client, service, the tmpfs)."""
    from cluster.serve import background
    from cluster.service import Service

    disk = tmpfs("512k")
    cfg = ServeConfig(results=str(disk / "results"), port=0, aggregators=1)
    service = Service(cfg, ScanConfig(prompts="seed", out=str(disk), model=str(other_model), stages=1, replicas=1))
    try:
        service.start()
        url, stop = background(service, "127.0.0.1", 0)
        yield Client(url), service, disk
        stop()
    finally:
        service.close()


@pytest.fixture(scope="module")
def other_reference(other_model):
    return reference_scan(other_model, TEXTS)


def one_shot(corpus: Path, out: Path, model: Path, options: dict) -> Path:
    rest = {k: v for k, v in options.items() if k not in ("high", "low", "red", "max_per_layer")}
    run_scan(
        ScanConfig(
            prompts=str(corpus), out=str(out), model=str(model), quiet=True, selection=selection(options), **rest
        )
    )
    return out


def test_twenty_concurrent_scans_with_their_own_thresholds_equal_their_one_shot_scans(
    served, corpus, other_model, other_reference, tmp_path
):
    import pandas as pd

    client, service, _ = served
    kinds = [CORPUS, str(corpus), pd.DataFrame(CORPUS), [row["text"] if "id" not in row else row for row in CORPUS]]
    jobs = []
    for i, options in enumerate(OPTION_SETS * 5):  # 20 scans in flight together, five per option set
        jobs.append((client.submit(kinds[i // 4 % 4], name=f"c{i}", **options), options))
    assert client.health()["scans"]
    for job, _ in jobs:
        status = job.wait()
        assert status["prompts_done"] == status["prompts_total"] == len(CORPUS)
    references = {}
    for k, options in enumerate(OPTION_SETS):
        references[k] = one_shot(corpus, tmp_path / f"one-shot-{k}", other_model, options)
        checked = assert_scan_matches(references[k], other_reference, selection(options))
        assert checked > 0
    for i, (job, options) in enumerate(jobs):
        run = job.result()
        if i // 4 % 4 != 3:  # the fourth kind leaves some prompts without ids: other ids, the same rows
            assert_same_output(run.out, references[i % 4])
        assert_scan_matches(run.out, other_reference, selection(options))
        check = run.manifest.verification  # each scan's fidelity check, run by the service
        assert check.passed and len(check.prompts) == min(16, len(CORPUS)) and check.device == "cpu"


def test_a_small_scan_finishes_before_a_large_earlier_one_which_cancels_and_resumes(served, other_model, tmp_path):
    client, service, _ = served
    big = tmp_path / "big.jsonl"
    write_jsonl(generate(600, families=["arithmetic", "countdown"], variants=["zero_shot", "icl"], seed=3), big)
    large = client.submit(str(big), name="large", batch_tokens=256, rows_per_part=2000)
    while large.status()["state"] != "running":
        time.sleep(0.1)
    small = client.submit(["apple, banana, cherry,", "2, 4, 6, 8,"], name="small")
    small.wait()
    assert large.status()["state"] == "running" and large.status()["prompts_done"] < 600
    assert large.cancel()["cancel_requested"]
    with pytest.raises(UserError, match=f"scan {large.id} cancelled"):
        large.wait()
    out = Path(large.status()["out"])
    manifest = read_manifest(out)
    assert manifest.status == "running" and manifest.parts  # a valid partial run
    stored = large.status()["corpus"]  # the corpus as the service keeps it, for `scan --resume` too
    assert Path(stored).read_bytes() == big.read_bytes()
    assert large.resume()["state"] in ("queued", "running")  # through the service: from its parts on
    large.wait()
    resumed = read_manifest(out)
    assert resumed.parts[: len(manifest.parts)] == manifest.parts and resumed.resumed_at
    assert_same_output(
        out, one_shot(big, tmp_path / "one-shot", other_model, {"batch_tokens": 256, "rows_per_part": 2000})
    )


def test_an_aggregator_process_and_a_stage_killed_mid_scan_leave_every_scan_complete(served, other_model, tmp_path):
    """Ray restarts a killed aggregator process (holding two scans) and a killed stage; every
    scan resends what its aggregator had not committed and ends with its one-shot tables."""
    import ray

    client, service, _ = served
    corpus = sequence_corpus(tmp_path / "faults.jsonl", 240, seed=9)
    options = {"batch_tokens": 256, "rows_per_part": 1500, "max_per_layer": 5}
    jobs = [client.submit(str(corpus), name=f"fault-{i}", **options) for i in range(3)]
    while not all(job.id in service.aggregators.held for job in jobs):  # admitted, each on a host
        time.sleep(0.05)
    held = {key: host for key, (host, _) in service.aggregators.held.items()}
    first = next(job for job in jobs if held.get(job.id) is service.aggregators.hosts[0])
    out = Path(first.status()["out"])
    while len(read_manifest(out).parts if (out / "manifest.json").exists() else []) < 2:
        time.sleep(0.05)
    names = ray.util.list_named_actors()
    for suffix in ("aggregator-0", "stage-1-0"):
        ray.kill(ray.get_actor(next(n for n in names if n.endswith(suffix))), no_restart=False)
    reference = one_shot(corpus, tmp_path / "one-shot", other_model, options)
    for job in jobs:
        job.wait()
        assert_same_output(Path(job.status()["out"]), reference)
    assert read_manifest(out).resumed_at  # its aggregator was opened again from the manifest


def test_a_scan_records_the_weights_the_service_loaded_not_the_files_read_again(served, monkeypatch):
    """The stages hold the weights loaded when the service started; a scan's manifest records
    their fingerprint, not that of whatever is at --model when the scan starts."""
    import cluster.driver as driver

    client, service, _ = served
    monkeypatch.setattr(driver, "fingerprint", lambda path: "the files read again")
    done = client.submit(["apple, banana, cherry,"], name="weights").wait()
    assert read_manifest(Path(done["out"])).model.fingerprint == service.plan.fingerprint != "the files read again"


def _raw(client: Client, method: str, path: str, body: bytes | None = None, headers: dict | None = None, token=TOKEN):
    request = urllib.request.Request(client.url + path, data=body, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    "method, path, body, headers, token, status, line",
    [
        ("POST", "/scans", b'{"text": "ok"}\n{"text": oops}\n', {}, TOKEN, 400, "the corpus:2: invalid JSON"),
        (
            "POST",
            "/scans?speed=fast",
            b'{"text": "a"}\n',
            {},
            TOKEN,
            400,
            "unknown option 'speed': use name or one of high",
        ),
        (
            "POST",
            "/scans?high=0&low=1",
            b'{"text": "a"}\n',
            {},
            TOKEN,
            400,
            "--high 0.0 must be greater than --low 1.0",
        ),
        ("POST", "/scans?high=lots", b'{"text": "a"}\n', {}, TOKEN, 400, "option high='lots' is not a number"),
        ("POST", "/scans?name=../up", b'{"text": "a"}\n', {}, TOKEN, 400, "name '../up' is not allowed"),
        (
            "POST",
            "/scans",
            b'{"path": "../secret.jsonl"}',
            {"content-type": "application/json"},
            TOKEN,
            403,
            "is outside the corpus root",
        ),
        (
            "POST",
            "/scans",
            b'{"path": "/etc/passwd"}',
            {"content-type": "application/json"},
            TOKEN,
            403,
            "is outside the corpus root",
        ),
        (
            "POST",
            "/scans",
            b'{"path": "escape.jsonl"}',
            {"content-type": "application/json"},
            TOKEN,
            403,
            "is outside the corpus root",
        ),
        ("POST", "/scans", b"x" * (1 << 20 | 1), {}, TOKEN, 413, "over the limit of 1,048,576"),
        ("POST", "/scans", b"x" * (8 << 20), {}, TOKEN, 413, "the body is 8,388,608 bytes, over the limit"),
        (
            "POST",
            "/scans",
            gzip.compress(b'{"text": "a"}\n' * 200_000),
            {"content-encoding": "gzip"},
            TOKEN,
            413,
            "once unzipped",
        ),
        ("POST", "/scans", b"\x1f\x8b not gzip", {}, TOKEN, 400, "is not valid gzip"),
        ("GET", "/scans/ffffffffffff", None, {}, TOKEN, 404, "matches no scan"),
        ("POST", "/scans/ffffffffffff/cancel", None, {}, TOKEN, 404, "matches no scan"),
        ("POST", "/scans/ffffffffffff/resume", None, {}, TOKEN, 404, "matches no scan"),
        ("DELETE", "/scans/ffffffffffff", None, {}, TOKEN, 404, "matches no scan"),
        ("DELETE", "/scans/ffffffffffff?files=maybe", None, {}, TOKEN, 422, "query.files: Input should be a valid"),
        ("GET", "/scans", None, {}, None, 401, "no token: send the service's NEUROSCAN_TOKEN"),
        ("GET", "/scans", None, {}, "wrong", 401, "a wrong token"),
        ("GET", "/nowhere", None, {}, TOKEN, 404, "Not Found: see /docs"),
    ],
)
def test_a_bad_request_is_one_line_and_the_service_keeps_serving(
    served, tmp_path_factory, method, path, body, headers, token, status, line
):
    client, service, root = served
    escape = root / "corpora" / "escape.jsonl"
    if not escape.is_symlink():
        (root / "secret.jsonl").write_text('{"text": "secret"}\n')
        escape.symlink_to(root / "secret.jsonl")
    before, stored = len(service.store.all()), set(service.corpora.iterdir())
    got, answer = _raw(client, method, path, body, headers, token)
    assert (got, list(answer)) == (status, ["error"]) and line in answer["error"] and "\n" not in answer["error"]
    assert len(service.store.all()) == before  # nothing queued
    assert set(service.corpora.iterdir()) == stored  # no corpus of a refused request is kept
    assert _raw(client, "GET", "/health")[1]["status"] == "ok"


def test_a_corpus_named_under_the_root_and_a_gzipped_body_are_scanned(served, corpus, other_reference):
    client, service, root = served
    (root / "corpora" / "mine.jsonl").write_bytes(corpus.read_bytes())
    status, answer = _raw(
        client, "POST", "/scans?name=by-path", b'{"path": "mine.jsonl"}', {"content-type": "application/json"}
    )
    assert status == 202 and answer["name"] == "by-path"
    body = gzip.compress(corpus.read_bytes())
    status, zipped = _raw(
        client,
        "POST",
        "/scans?name=zipped&max_per_layer=5",
        body,
        {"content-type": "application/x-ndjson", "content-encoding": "gzip"},
    )
    assert status == 202
    for scan_id, sel in ((answer["id"], Selection()), (zipped["id"], Selection(max_per_layer=5))):
        done = client.job(scan_id).wait()
        assert_scan_matches(Path(done["out"]), other_reference, sel)
    listing = client.request("GET", f"/scans/{zipped['id']}/files")["files"]
    assert listing[0] == "manifest.json" and any(f.startswith("activations/layer_04/") for f in listing)
    assert client.request("GET", f"/scans/{zipped['id']}/files/manifest.json")["status"] == "complete"
    with pytest.raises(UserError, match="a scan named 'zipped' exists already: choose another --name"):
        client.submit(["x"], name="zipped")
    assert client.request("GET", "/openapi.json")["paths"]["/scans"]


def test_the_cli_submits_follows_and_cancels(served, corpus, capsys, monkeypatch):
    from cluster.cli import main

    client, service, _ = served
    monkeypatch.setenv("NEUROSCAN_TOKEN", TOKEN)
    url = ["--url", client.url]
    assert main(["submit", str(corpus), "--name", "from-cli", "--high", "2.5", *url]) == 0
    line = capsys.readouterr().out
    assert line.startswith("scan ") and "from-cli, 9 prompts" in line
    scan_id = line.split()[1]
    assert main(["wait", scan_id[:6], "--progress", *url]) == 0
    assert f"scan {scan_id} completed: " in capsys.readouterr().out
    assert main(["status", *url]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["id", "name", "state"] and "from-cli" in table
    assert main(["cancel", scan_id, *url]) == 0  # an ended scan stays as it ended
    assert "completed" in capsys.readouterr().out
    assert main(["resume", scan_id, *url]) == 2  # only a cancelled or failed scan resumes
    assert capsys.readouterr().err == (
        f"neuroscan: error: scan {scan_id} is completed: only a cancelled or failed scan can be resumed\n"
    )
    assert main(["submit", str(corpus), "--high", "0", "--low", "1", *url]) == 2
    assert (
        capsys.readouterr().err
        == "neuroscan: error: --high 0.0 must be greater than --low 1.0: raise --high or lower --low\n"
    )
    assert main(["status", "nope", *url]) == 2
    assert "scan id 'nope' matches no scan" in capsys.readouterr().err
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the neuroscan service at http://127.0.0.1:9" in capsys.readouterr().err


def test_an_ended_scan_is_deleted_with_its_stored_corpus_and_on_request_its_tables(
    served, corpus, capsys, monkeypatch, tmp_path
):
    from cluster.cli import main

    client, service, _ = served
    monkeypatch.setenv("NEUROSCAN_TOKEN", TOKEN)
    big = sequence_corpus(tmp_path / "big.jsonl", 400, seed=11)
    running = client.submit(str(big), name="to-delete", batch_tokens=256)
    stored = Path(running.status()["corpus"])
    assert stored.is_relative_to(service.corpora) and stored.is_file()
    with pytest.raises(UserError, match=f"scan {running.id} is (queued|running): cancel it first"):
        running.delete()
    running.cancel()
    with pytest.raises(UserError, match="cancelled"):
        running.wait()
    out = Path(running.status()["out"])
    assert running.delete() == {
        "id": running.id,
        "name": "to-delete",
        "out": str(out),
        "files_deleted": False,
        "kept": [],
    }
    assert stored.is_file() and read_manifest(out) is not None  # the unfinished run and its corpus stay: resumable
    assert running.id not in [s["id"] for s in client.scans()]
    with pytest.raises(UserError, match="a scan named 'to-delete' exists already"):  # its directory is still there
        client.submit(["x"], name="to-delete")
    with pytest.raises(UserError, match=f"scan id '{running.id}' matches no scan"):
        running.delete()

    kept = client.submit(str(corpus), name="kept-tables")
    kept.wait()  # a completed scan deleted without --files: its tables stay, its stored corpus goes
    kept_corpus = Path(kept.status()["corpus"])
    assert main(["delete", kept.id, "--url", client.url]) == 0
    assert capsys.readouterr().out == f"scan {kept.id} deleted; its tables stay in {service.results / 'kept-tables'}\n"
    assert not kept_corpus.exists() and read_manifest(service.results / "kept-tables").complete

    done = client.submit(str(corpus), name="delete-files")
    done.wait()  # returns once the scan is recorded ended: its directory is free to delete at once
    out = Path(done.status()["out"])
    (out / "notes.md").write_text("mine")
    assert main(["delete", done.id[:8], "--files", "--url", client.url]) == 0
    assert capsys.readouterr().out == f"scan {done.id} deleted with its tables; {out} keeps notes.md\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]  # what no scan wrote stays
    again = client.submit(str(corpus), name="delete-files-2")
    again.wait()
    assert main(["delete", again.id, "--files", "--url", client.url]) == 0
    gone = service.results / "delete-files-2"
    assert capsys.readouterr().out == f"scan {again.id} deleted with its tables ({gone})\n"
    assert not gone.exists()  # nothing else was there: the directory goes too
    assert main(["delete", again.id, "--url", client.url]) == 2
    assert capsys.readouterr().err.endswith(
        f"scan id '{again.id}' matches no scan: give more of the id (`neuroscan status` lists them)\n"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """The service in a process (and session) of its own, with a local Ray of its own."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **(env or {}), "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}
    process = subprocess.Popen(
        [sys.executable, "-m", "neuroscan", "serve", *args],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    process.ray_tmp = ray_tmp
    return process


def _kill(process: subprocess.Popen) -> None:
    """kill -9 of the service and everything it started (its local Ray, found by its temp dir)."""
    import psutil

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    for other in psutil.process_iter(["cmdline"]):
        if any(process.ray_tmp in part for part in other.info["cmdline"] or ()):
            other.kill()


def _ready(client: Client, process: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            client.health()
            return
        except UserError:
            time.sleep(0.5)
    raise AssertionError(f"the service did not start: {log.read_text()}")


def test_a_service_killed_mid_scan_resumes_every_scan_when_started_again(ray_session, other_model, tmp_path):
    """kill -9 of the service (and its Ray) while one scan runs and one waits in the queue;
    started again on the same results, both complete with the one-shot scans' tables."""
    corpus = tmp_path / "icl.jsonl"
    write_jsonl(generate(300, families=["days", "months", "arithmetic"], variants=["zero_shot"], seed=5), corpus)
    port, log = _free_port(), tmp_path / "service.log"
    args = [
        "--model",
        str(other_model),
        "--stages",
        "2",
        "--results",
        str(tmp_path / "results"),
        "--port",
        str(port),
        "--max-running",
        "1",
    ]
    client = Client(f"http://127.0.0.1:{port}")
    process = _start(args, log)
    try:
        _ready(client, process, log)
        running = client.submit(str(corpus), name="running", batch_tokens=200, rows_per_part=1500)
        queued = client.submit(str(corpus), name="queued", high=2.0, batch_tokens=300)
        out = Path(running.status()["out"])
        while not ((m := read_manifest(out)) and m.parts):  # killed once a part is committed
            assert running.status()["state"] in ("queued", "running"), running.status()["error"]
            time.sleep(0.2)
        _kill(process)
        process = _start(args, log)
        _ready(client, process, log)
        states = {s["name"]: s["state"] for s in client.scans()}
        assert states["running"] != "failed" and states["queued"] != "failed"
        running.wait()
        queued.wait()
    finally:
        _kill(process)
    assert_same_output(out, one_shot(corpus, tmp_path / "a", other_model, {"batch_tokens": 200, "rows_per_part": 1500}))
    assert_same_output(
        tmp_path / "results" / "queued",
        one_shot(corpus, tmp_path / "b", other_model, {"high": 2.0, "batch_tokens": 300}),
    )


def test_a_full_disk_fails_its_scan_in_one_line_refuses_a_corpus_with_507_and_resume_finishes_the_scan(
    served_on_a_small_disk, other_model, tmp_path
):
    """--results on a real tmpfs the scan fills: the scan fails with the aggregator's one line
    (not Ray's traceback), keeping its committed parts; the service goes on answering. With the
    disk full, a corpus sent is refused with a 507 and nothing of it is kept; with room again,
    resuming the scan ends with the tables of a scan that never ran out."""
    client, service, disk = served_on_a_small_disk
    corpus = sequence_corpus(tmp_path / "big.jsonl", 600, seed=3)
    options = {"batch_tokens": 1024, "rows_per_part": 1500, "max_per_layer": 5}
    job = client.submit(str(corpus), name="big", **options)
    with pytest.raises(UserError, match=f"scan {job.id} failed: .*No space left on device"):
        job.wait()
    status = job.status()
    assert status["state"] == "failed" and "\n" not in status["error"], status["error"]
    assert status["error"].endswith(
        f"fix the disk (space, permissions), then resume the scan (`neuroscan resume {job.id}`)"
    )
    out = Path(status["out"])
    failed = read_manifest(out)
    assert failed.status == "running" and failed.parts and not list(out.rglob("*.tmp"))
    assert client.health()["status"] == "ok" and [s["name"] for s in client.scans()] == ["big"]

    stored = set(service.corpora.iterdir())
    ballast = fill(disk)
    got, answer = _raw(client, "POST", "/scans?name=late", b'{"text": "1, 2, 3,"}\n' * 100)
    assert (got, list(answer)) == (507, ["error"]) and "\n" not in answer["error"]
    assert answer["error"] == (
        f"the corpus (2,100 bytes) cannot be stored in {service.corpora} (No space left on device): free space on "
        "its disk (the service's --state, by default under --results), then submit it again"
    )
    assert set(service.corpora.iterdir()) == stored and [s["name"] for s in client.scans()] == ["big"]
    assert client.health()["status"] == "ok" and job.status()["state"] == "failed"

    ballast.unlink()
    assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], capture_output=True).returncode == 0
    assert job.resume()["state"] in ("queued", "running")
    job.wait()
    assert read_manifest(out).parts[: len(failed.parts)] == failed.parts
    assert_same_output(out, one_shot(corpus, tmp_path / "one-shot", other_model, options))


def test_serving_beyond_loopback_needs_a_token(monkeypatch, capsys, tmp_path):
    from cluster.cli import main

    monkeypatch.delenv("NEUROSCAN_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--results", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (
        "neuroscan: error: --host 0.0.0.0 is reachable from other machines: set NEUROSCAN_TOKEN (clients send it "
        "too), or serve on 127.0.0.1\n"
    )
    assert not (tmp_path / "r").exists()  # refused before anything is loaded or written


def test_a_service_scan_whose_rows_fail_the_fidelity_check_completes_with_the_line(
    other_model, corpus, tmp_path, capsys
):
    """Stages whose block 3 has wrong weights (NEUROSCAN_FAULT_PERTURB_LAYER): the scan
    completes with its tables, its manifest's check fails from layer 3, its status carries the
    line, and `neuroscan wait` says it and exits 3."""
    from cluster.cli import main

    port, log = _free_port(), tmp_path / "service.log"
    args = ["--model", str(other_model), "--results", str(tmp_path / "results"), "--port", str(port)]
    process = _start(args, log, env={"NEUROSCAN_FAULT_PERTURB_LAYER": "3"})
    try:
        client = Client(f"http://127.0.0.1:{port}")
        _ready(client, process, log)
        job = client.submit(str(corpus), name="perturbed", verify=4)
        assert main(["wait", job.id, "--url", client.url]) == 3
        err = capsys.readouterr().err
        assert err.startswith("neuroscan: fidelity check FAILED from layer 3") and err.count("\n") == 1, err
        status = job.status()
        assert status["state"] == "completed" and status["error"].startswith("fidelity check FAILED from layer 3")
        check = job.result().manifest.verification
        assert not check.passed and len(check.prompts) == 4
        assert [int(k) for k, layer in check.layers.items() if layer.off][:1] == [3]
        assert not any(check.layers[str(k)].off for k in range(3))
        assert job.result().read("activations").num_rows > 0  # the tables are kept
    finally:
        _kill(process)
