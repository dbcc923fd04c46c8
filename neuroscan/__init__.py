"""neuroscan: which MLP neurons of a language model fire on which tokens, over a corpus.

The package is the project's ground floor (errors, configuration, messages, the manifest
and the output schema, which import nothing else of the project) and its public Python API,
whose names load lazily on first use, so that importing a ground-floor module pulls in
neither Ray nor torch::

    import neuroscan
    manifest = neuroscan.run_scan(neuroscan.ScanConfig(prompts="seed", out="runs/a"))
    run = neuroscan.open_run("runs/a")
    run.read("activations", layer=27).to_pandas()

    svc = neuroscan.Client("http://127.0.0.1:8470")      # a running `neuroscan serve`
    job = svc.submit(["apple, banana, cherry,"], high=3.0)
"""

from __future__ import annotations

import importlib

API = {
    "UserError": "neuroscan.errors",
    "Selection": "neuroscan.config",
    "ScanConfig": "neuroscan.config",
    "Manifest": "neuroscan.manifest",
    "run_scan": "cluster.driver",
    "open_run": "results.run",
    "Run": "results.run",
    "compare": "results.compare",
    "Client": "cluster.client",
}
"""Each public name and the module that defines it."""

__all__ = sorted(API)


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'neuroscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
