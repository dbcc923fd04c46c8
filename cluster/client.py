"""The Python client of ``neuroscan serve``: submit scans, follow them, get their tables.

    svc = neuroscan.Client("http://127.0.0.1:8470")
    job = svc.submit(["apple, banana, cherry,", "2, 4, 6, 8,"], high=3.0, low=0.0)
    job.wait(progress=True)
    run = job.result()

Every error the service answers (a 4xx with one line) is raised as `UserError` with that
line; a service that cannot be reached is one line too. The standard library's HTTP client
is enough: requests are small JSON, and the corpus goes as JSONL in one body.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from cluster.store import ENDED
from neuroscan.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8470"


def service_url(url: str | None = None) -> str:
    """``url``, else ``$NEUROSCAN_URL``, else the default local service."""
    return (url or os.environ.get("NEUROSCAN_URL") or DEFAULT_URL).rstrip("/")


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0):
        self.url = service_url(url)
        self.token = token if token is not None else os.environ.get("NEUROSCAN_TOKEN")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Any:
        """One call; the answer's JSON (or bytes for a file). A 4xx/5xx raises its line."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as answer:
                data = answer.read()
                kind = answer.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            raise UserError(_error_line(err)) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"cannot reach the neuroscan service at {self.url} ({reason}): start it with `neuroscan serve`, "
                "or give its address with --url or NEUROSCAN_URL"
            ) from None
        return json.loads(data) if kind.startswith("application/json") else data

    def health(self) -> dict:
        return self.request("GET", "/health")

    def submit(self, prompts, name: str | None = None, **options) -> Job:
        """Submit a scan of ``prompts``: a list of strings or of dicts (``text`` and the optional
        ``id``, ``family``, ``variant``, ``expected``; other keys become columns of ``prompts/``),
        a pandas or Polars DataFrame with those columns, or the path of a JSONL file. ``options``: the scan's own flags (``high``,
        ``low``, ``red``, ``max_per_layer``, ``top_k``, ``batch_tokens``, ``format``...)."""
        query = {k: v for k, v in {"name": name, **options}.items() if v is not None}
        body = gzip.compress(jsonl_bytes(prompts), compresslevel=1)
        headers = {"content-type": "application/x-ndjson", "content-encoding": "gzip"}
        answer = self.request("POST", "/scans?" + urllib.parse.urlencode(query), body, headers)
        return Job(self, answer["id"])

    def scans(self) -> list[dict]:
        return self.request("GET", "/scans")["scans"]

    def job(self, scan_id: str) -> Job:
        """The scan whose id is or starts with ``scan_id``."""
        return Job(self, self.request("GET", f"/scans/{urllib.parse.quote(scan_id)}")["id"])


class Job:
    """One submitted scan."""

    def __init__(self, client: Client, scan_id: str):
        self.client, self.id = client, scan_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict:
        return self.client.request("GET", f"/scans/{self.id}")

    def cancel(self) -> dict:
        return self.client.request("POST", f"/scans/{self.id}/cancel")

    def resume(self) -> dict:
        """Queue this cancelled or failed scan again; it continues from what it committed."""
        return self.client.request("POST", f"/scans/{self.id}/resume")

    def delete(self, files: bool = False) -> dict:
        """Forget this ended scan and the corpus the service stored for it; ``files``: also
        what it wrote in its output directory. A queued or running scan: cancel it first."""
        return self.client.request("DELETE", f"/scans/{self.id}?files={'true' if files else 'false'}")

    def wait(self, progress: bool = False, poll_s: float = 0.5) -> dict:
        """The scan's status once it has ended; raises its line unless it completed. A
        completed scan whose rows failed the fidelity check carries that line as ``error``,
        and is returned with a warning (its tables are kept)."""
        bar = None
        while (status := self.status())["state"] not in ENDED:
            if progress:
                bar = bar or _bar(status)
                bar.total = status["prompts_total"] or None
                bar.n = status["prompts_done"]
                bar.set_postfix_str(status["state"], refresh=True)
            time.sleep(poll_s)
        if bar is not None:
            bar.n = status["prompts_done"]
            bar.close()
        if status["state"] != "completed":
            raise UserError(f"scan {self.id} {status['state']}: {status.get('error') or 'no error recorded'}")
        if status.get("error"):
            warnings.warn(f"scan {self.id}: {status['error']}", stacklevel=2)
        return status

    def result(self, into: str | Path | None = None):
        """The finished scan's tables, as `results.run.Run` reads them: from its output
        directory when this machine sees it (a shared file system), else downloaded into
        ``into`` (default: a directory named after the scan, under the current one)."""
        from results.run import open_run

        status = self.status()
        if status["state"] != "completed":
            raise UserError(f"scan {self.id} is {status['state']}, not completed: wait for it (job.wait())")
        if Path(status["out"], "manifest.json").is_file():
            return open_run(status["out"])
        local = Path(into or status["name"])
        listing = self.client.request("GET", f"/scans/{self.id}/files")["files"]
        for rel in listing:
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.client.request("GET", f"/scans/{self.id}/files/{urllib.parse.quote(rel)}"))
        return open_run(local)


def jsonl_bytes(prompts) -> bytes:
    """The corpus as JSONL bytes."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise UserError(f"prompts {path} is not a file: give a .jsonl file, a list of prompts or a DataFrame")
        return path.read_bytes()
    if hasattr(prompts, "to_dicts"):  # Polars
        prompts = prompts.to_dicts()
    elif hasattr(prompts, "to_dict"):  # pandas
        prompts = prompts.to_dict(orient="records")
    # A DataFrame's missing values (None, NaN) are fields left out.
    rows = [
        {"text": p} if isinstance(p, str) else {k: v for k, v in p.items() if v is not None and v == v} for p in prompts
    ]
    if not rows:
        raise UserError("no prompts to submit: give at least one")
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


def _error_line(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]
    except (ValueError, KeyError, TypeError):
        return f"the service answered {err.code} {err.reason}"


def _bar(status: dict):
    from tqdm import tqdm

    return tqdm(total=status["prompts_total"] or None, unit="prompt", file=sys.stderr, dynamic_ncols=True)


def status_lines(scans: list[dict]) -> list[str]:
    """``neuroscan status``: one line a scan."""
    lines = [f"{'id':<12}  {'name':<20}  {'state':<10}  {'pos':>3}  {'prompts':>15}  {'tokens/s':>10}  {'ETA':>7}"]
    for s in scans:
        done = f"{s['prompts_done']}/{s['prompts_total']}"
        rate = "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"
        eta = "-" if s["eta_s"] is None else f"{s['eta_s']:.0f} s"
        lines.append(
            f"{s['id']:<12}  {s['name'][:20]:<20}  {s['state']:<10}  {s['position'] or '':>3}  {done:>15}  "
            f"{rate:>10}  {eta:>7}"
        )
        if s.get("error"):
            lines.append(f"{'':<14}{s['error']}")
    return lines
