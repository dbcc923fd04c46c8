"""``manifest.json``: the run's identity and the list of committed parts, replaced atomically.

A file under the output directory counts only once the manifest lists it. The manifest is
written to a temporary file, fsynced, renamed over the old one and the directory fsynced,
so a crash leaves either the old manifest or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "manifest.json"


def write_manifest(out_dir: Path, manifest: dict) -> None:
    out_dir = Path(out_dir)
    tmp = out_dir / f".{NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / NAME)
    fsync_dir(out_dir)


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / NAME
    return json.loads(path.read_text()) if path.exists() else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
