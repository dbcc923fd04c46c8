"""Write one table file atomically (temporary name, fsync, rename) and describe it."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuroscan.manifest import PartFile, file_sha256, fsync_dir

SUFFIX = {"parquet": ".parquet", "arrow": ".arrow"}


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Flat integer and string columns: floats and band bytes rarely repeat, and trying a
    dictionary on them costs ~20 % of a part's encoding time for nothing."""
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_string(f.type)]


def write_table(table: pa.Table, out_dir: Path, rel_stem: str, fmt: str) -> PartFile:
    """Write ``table`` to ``out_dir/rel_stem + suffix``; the file appears complete or not at all."""
    rel = rel_stem + SUFFIX[fmt]
    final = Path(out_dir) / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        if fmt == "parquet":
            pq.write_table(table, tmp, compression="zstd", use_dictionary=dictionary_columns(table.schema))
        else:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        sha256 = file_sha256(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = tmp.stat().st_size
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return PartFile(path=rel, rows=table.num_rows, bytes=size, sha256=sha256)
