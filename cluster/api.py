"""The HTTP API of ``neuroscan serve`` (FastAPI; the schema at ``/openapi.json``).

    POST /scans                  queue a scan: the corpus as the body (JSONL, gzip accepted), or
                                 {"path": ...} under --corpus-root; options in the query string
    GET  /scans                  every scan
    GET  /scans/{id}             one scan: state, queue position, progress, tokens/s, ETA, error
    POST /scans/{id}/cancel      stop it within one micro-batch (what is committed stays valid)
    POST /scans/{id}/resume      queue a cancelled or failed scan again, to continue where it stopped
    DELETE /scans/{id}           forget an ended scan and its stored corpus; ?files=true: its tables too
    GET  /scans/{id}/files       the finished scan's files; /files/{path} one of them
    GET  /health                 the service and its pipelines

A bad request is a 4xx whose body is ``{"error": "<one line: the problem and the fix>"}``;
the service goes on serving. A request that needs room the service's state directory lacks (a
corpus to store, a scan to add to the table on a full disk) is a 507 (Insufficient Storage:
the server cannot store what the request needs) with one line, and nothing of it is kept.
With ``NEUROSCAN_TOKEN`` set (required to bind anything but loopback) every request needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import gzip
import hmac
import json
import time
import zlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cluster.service import Conflict, Service
from cluster.store import ENDED, QUEUED, Scan, StateFull
from neuroscan.config import SCAN_OPTIONS, ScanConfig, options
from neuroscan.errors import UserError
from neuroscan.manifest import NAME as MANIFEST_NAME
from neuroscan.manifest import read_manifest
from prompts.readers import read_prompts

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Refused(Exception):
    """A request answered with ``status`` and one line."""

    def __init__(self, status: int, line: str):
        super().__init__(line)
        self.status = status


def make_app(service: Service, token: str | None = None) -> FastAPI:
    app = FastAPI(title="neuroscan", summary="Scan the MLP neurons of a resident model over submitted corpora.")
    max_body = service.cfg.max_body_mb << 20

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                problem = "no token" if not given else "a wrong token"
                return _error(401, f"{problem}: send the service's NEUROSCAN_TOKEN as 'Authorization: Bearer <token>'")
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused):
        return _error(err.status, str(err))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, err: Conflict):
        return _error(409, str(err))

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        return _error(400, str(err))

    @app.exception_handler(StateFull)
    async def state_full(request: Request, err: StateFull):
        return _error(507, str(err))

    @app.exception_handler(LookupError)
    async def not_found(request: Request, err: LookupError):
        return _error(404, str(err.args[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, f"{err.detail}: see /docs for the API")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg')}: see /docs for the API")

    @app.post("/scans", status_code=202)
    async def submit(request: Request) -> dict:
        """Queue a scan. The body is the corpus (JSONL; ``content-encoding: gzip`` or gzip bytes
        accepted) or, as JSON, ``{"path": "<file under --corpus-root>"}``. The query string
        holds ``name`` and the scan's options (``high``, ``low``, ``red``, ``max_per_layer``,
        ``top_k``, ``batch_tokens``, ``format``, ``truncate``, ``on_error``, ``rows_per_part``)."""
        query = dict(request.query_params)
        name = query.pop("name", None)
        if name is not None:
            check_name(name)
        opts = parse_options(query)
        service.job_config(opts, "seed", str(service.results)).validate()  # the options' own rules
        body = await read_body(request, max_body)
        named = request.headers.get("content-type", "").startswith("application/json")
        corpus = corpus_path(body, service) if named else service.corpora / f"{time.time_ns():x}.jsonl"
        try:
            if not named:
                store_corpus(corpus, body)
            n_prompts = await run_in_threadpool(count_prompts, corpus)
            scan = await run_in_threadpool(service.submit, corpus, opts, name, n_prompts)
        except BaseException:
            if corpus.is_relative_to(service.corpora):
                corpus.unlink(missing_ok=True)
            raise
        return describe(scan, service)

    @app.get("/scans")
    def scans() -> dict:
        """Every scan, oldest first."""
        positions = service.positions()
        return {"scans": [describe(s, service, positions) for s in service.store.all()]}

    @app.get("/scans/{scan_id}")
    def scan(scan_id: str) -> dict:
        """One scan (its id, or the start of it)."""
        return describe(service.find(scan_id), service)

    @app.post("/scans/{scan_id}/cancel")
    def cancel(scan_id: str) -> dict:
        """Stop a scan within one micro-batch; what it committed stays valid (and resumable)."""
        return describe(service.cancel(scan_id), service)

    @app.post("/scans/{scan_id}/resume", status_code=202)
    def resume(scan_id: str) -> dict:
        """Queue a cancelled or failed scan again; it keeps its committed parts and scans the rest."""
        return describe(service.resume(scan_id), service)

    @app.delete("/scans/{scan_id}")
    def delete(scan_id: str, files: bool = False) -> dict:
        """Forget an ended scan (completed, failed or cancelled) and the corpus stored for it;
        with ``files=true`` also what it wrote in its output directory. 409 for a queued or
        running scan: cancel it first."""
        return service.delete(scan_id, files)

    @app.get("/scans/{scan_id}/files")
    def files(scan_id: str) -> dict:
        """The committed files of a scan (paths under its output directory)."""
        found = service.find(scan_id)
        out = Path(found.out)
        manifest = read_manifest(out) if out.is_dir() else None
        if manifest is None:
            return {"files": []}
        listed = [f.path for f in manifest.files()] + [f.path for f in manifest.empty_layers]
        listed += [manifest.neurons.path] if manifest.neurons else []
        report = out / "report"
        listed += (
            sorted(p.relative_to(out).as_posix() for p in report.rglob("*") if p.is_file()) if report.is_dir() else []
        )
        return {"files": [MANIFEST_NAME, *listed]}

    @app.get("/scans/{scan_id}/files/{path:path}")
    def file(scan_id: str, path: str):
        """One file of a scan's output directory."""
        out = Path(service.find(scan_id).out).resolve()
        target = (out / path).resolve()
        if not target.is_relative_to(out) or not target.is_file():
            raise Refused(404, f"{path!r} is not a file of this scan: `GET /scans/{scan_id}/files` lists them")
        return FileResponse(target)

    @app.get("/health")
    def health() -> dict:
        """Whether the service runs, and what it serves."""
        states = [s.state for s in service.store.all()]
        return {
            "status": "ok" if service.failure is None else "failed",
            "error": service.failure,
            "model": service.plan.model_id,
            "dtype": service.plan.dtype,
            "stages": service.template.stages,
            "replicas": service.template.replicas,
            "tensor_parallel": service.template.tensor_parallel,
            "replicas_live": len(service.pipelines.live),
            "nodes": service.pipelines.nodes(),
            "device": service.template.device,
            "loaded_s": round(service.loaded_s, 1),
            "scans": {state: states.count(state) for state in sorted(set(states))},
        }

    return app


def _error(status: int, line: str) -> JSONResponse:
    return JSONResponse({"error": line}, status_code=status)


def check_name(name: str) -> None:
    if not name or len(name) > 64 or set(name) - NAME_CHARS or name.startswith("."):
        raise Refused(
            400, f"name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )


OPTION_TYPES = {f.name: kind for f, _, kind in options(ScanConfig) if f.name in SCAN_OPTIONS}


def parse_options(query: dict[str, str]) -> dict:
    """The scan's options from the query string, as their declared types; one line for an
    unknown option or a value of the wrong type (the values' rules are `ScanConfig`'s)."""
    out = {}
    for key, text in query.items():
        if key not in OPTION_TYPES:
            raise Refused(400, f"unknown option {key!r}: use name or one of {', '.join(SCAN_OPTIONS)}")
        kind = OPTION_TYPES[key]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = text.lower() in ("true", "1")
            else:
                out[key] = kind(text)
        except ValueError:
            raise Refused(400, f"option {key}={text!r} is not {_kind_name(kind)}: give one") from None
    return out


def _kind_name(kind) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false"}.get(kind, "a string")


DRAIN_FACTOR = 16  # a refused body up to this many times the limit is still read, so its sender gets the 413


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, gunzipped, refused past ``limit`` bytes (before or after gunzip).

    A body over the limit is read to its end (up to ``DRAIN_FACTOR`` times the limit) before
    the 413 goes back: closing on unread bytes resets the connection, and the sender would see
    a broken pipe instead of the line that says what to do.
    """
    declared = request.headers.get("content-length")
    refused = None
    if declared and declared.isdigit() and int(declared) > limit:
        refused = Refused(
            413,
            f"the body is {int(declared):,} bytes, over the limit of {limit:,}: split the corpus into several scans",
        )
        if int(declared) > DRAIN_FACTOR * limit:
            raise refused
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if refused is None and seen > limit:
            refused = Refused(
                413, f"the body is over the limit of {limit:,} bytes: split the corpus into several scans"
            )
        if refused is None:
            body += chunk
        elif seen > DRAIN_FACTOR * limit:
            break
    if refused is not None:
        raise refused
    if request.headers.get("content-encoding") == "gzip" or body[:2] == b"\x1f\x8b":
        try:
            inflate = zlib.decompressobj(wbits=31)
            data = inflate.decompress(bytes(body), limit + 1)
        except zlib.error as err:
            raise Refused(400, f"the body is not valid gzip ({err}): send it plain or gzip it whole") from None
        if len(data) > limit:
            raise Refused(413, f"the corpus is over the limit of {limit:,} bytes once unzipped: split it")
        return data
    return bytes(body)


def corpus_path(body: bytes, service: Service) -> Path:
    """A server-side corpus named by a JSON body ``{"path": ...}``, under ``--corpus-root``."""
    try:
        request = json.loads(body)
        rel = request["path"]
        if not isinstance(rel, str) or set(request) != {"path"}:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise Refused(
            400, 'a JSON body must be {"path": "<corpus file under the corpus root>"}; send JSONL as the body otherwise'
        ) from None
    root = service.cfg.corpus_root
    if root is None:
        raise Refused(403, "this service reads no corpus from its disk (no --corpus-root): send the corpus as the body")
    root = Path(root).resolve()
    target = (root / rel).resolve()  # symlinks resolved too
    if Path(rel).is_absolute() or not target.is_relative_to(root):
        raise Refused(403, f"path {rel!r} is outside the corpus root: name a file under it, relative to it")
    if target.is_relative_to(service.state_dir):  # the corpora other scans sent, which `delete` removes
        raise Refused(403, f"path {rel!r} is in the service's state directory: name a corpus of your own")
    if not target.is_file():
        raise Refused(404, f"path {rel!r} is not a file under the corpus root")
    return target


def store_corpus(path: Path, body: bytes) -> None:
    """Keep a submitted corpus at ``path``, in the service's state directory; no room is a 507."""
    try:
        path.write_bytes(body)
    except OSError as err:
        raise Refused(
            507,
            f"the corpus ({len(body):,} bytes) cannot be stored in {path.parent} ({err.strerror or err}): free space "
            "on its disk (the service's --state, by default under --results), then submit it again",
        ) from None


def count_prompts(corpus: Path) -> int:
    """Read the whole corpus once, checking every row (a bad row is one line: its number and the fix)."""
    try:
        return sum(len(chunk) for chunk in read_prompts(str(corpus)))
    except UserError as err:
        raise UserError(str(err).replace(str(corpus), "the corpus")) from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError(f"the corpus cannot be read ({err})") from None


def describe(scan: Scan, service: Service, positions: dict[str, int] | None = None) -> dict:
    """What a client sees of a scan."""
    if scan.state != QUEUED:
        position = None
    else:  # one scan: counted in the table, not by listing every scan
        position = service.store.position(scan.id) if positions is None else positions.get(scan.id)
    rate = scan.tokens_done / scan.seconds if scan.seconds > 0 else None
    prompt_rate = scan.prompts_done / scan.seconds if scan.seconds > 0 else None
    left = scan.prompts_total - scan.prompts_done
    eta = left / prompt_rate if prompt_rate and scan.state not in ENDED else None
    return {
        "id": scan.id,
        "name": scan.name,
        "state": scan.state,
        "position": position,
        "prompts_done": scan.prompts_done,
        "prompts_total": scan.prompts_total,
        "tokens_per_s": rate,
        "eta_s": eta,
        "error": scan.error,
        "out": scan.out,
        "corpus": scan.corpus,
        "options": scan.options,
        "submitted_at": scan.submitted_at,
        "started_at": scan.started_at,
        "finished_at": scan.finished_at,
        "cancel_requested": scan.cancel and scan.state not in ENDED,
    }
