"""neuroscan: which MLP neurons of a language model fire on which tokens, over a corpus.

The package is the project's ground floor (errors, configuration, messages, the manifest
and the output schema, which import nothing else of the project) and its public Python API,
whose names load lazily on first use, so that importing a ground-floor module pulls in
neither Ray nor torch::

    import neuroscan
    run = neuroscan.scan(["apple, banana, cherry,", "2, 4, 6, 8,"], high=3.0, low=-0.1)
    run = neuroscan.open("runs/a")                      # or a finished scan's directory
    run.activations(layer=27, with_prompts=True, to="pandas")
    run.show("gen-000003", layer=27)                    # coloured token strips in Jupyter

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
    "scan": "cluster.inline",
    "open": "results.run:open_run",
    "run_scan": "cluster.driver",
    "open_run": "results.run",
    "decode_bands": "neuroscan.bands:decode_many",
    "Run": "results.run",
    "compare": "results.compare",
    "Client": "cluster.client",
}
"""Each public name and the module that defines it (``module:name`` where it is named otherwise there)."""

__all__ = sorted(set(API) - {"open"})
"""``from neuroscan import *`` leaves the builtin ``open`` alone; ``neuroscan.open`` is there."""


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'neuroscan' has no attribute {name!r}")
    module, _, attribute = API[name].partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
