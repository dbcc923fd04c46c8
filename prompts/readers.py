"""Read a prompt corpus from JSONL, CSV, Parquet, plain text or a built-in name, in chunks.

A corpus may also be a directory of such files (a dataset's shards: ``train-00000-of-00004.parquet``
as the Hugging Face hub lays them out, or the Pile's ``00.jsonl.zst``), read in name order as
one corpus.

Every reader yields lists of `Prompt` (a chunk at a time, never the whole file) and checks
each row as it goes (``text`` required; ``id``, ``family``, ``variant``, ``expected`` optional): a bad row stops the read with a one-line `UserError` naming the line or
id and the fix. ``prompt_id`` is the 0-based position among the prompts; ``id`` is the user's
id or ``str(prompt_id)``. Every other column is kept in the prompt's ``extra`` fields, which
the scan writes into ``prompts/`` (`neuroscan.corpus_columns`: their types, the names refused).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuroscan.corpus_columns import COMPUTED, READ, extra_value, is_extra
from neuroscan.errors import UserError
from neuroscan.messages import Prompt
from prompts.seed import BUILTIN

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
}
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
"""A line-based corpus may be compressed (``corpus.jsonl.zst``, as the Pile ships): pyarrow
decompresses it as it is read."""


def read_prompts(source: str, chunk: int = 4096) -> Iterator[list[Prompt]]:
    """Yield the corpus in chunks of at most ``chunk`` prompts, checking every row."""
    rows = _rows(source)
    seen: set[str] = set()
    batch: list[Prompt] = []
    for where, row in rows:
        prompt = _to_prompt(len(seen), where, row)
        if prompt.id in seen:
            raise UserError(f"{where}: id {prompt.id!r} appears twice: give every prompt a unique id")
        seen.add(prompt.id)
        batch.append(prompt)
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch
    if not seen:
        raise UserError(f"prompt corpus {source} holds no prompts: add at least one")


def _rows(source: str) -> Iterable[tuple[str, dict]]:
    """(where, row) pairs; ``where`` names the line or row for error messages."""
    if source in BUILTIN and not Path(source).exists():
        return ((f"{source}[{i}]", row) for i, row in enumerate(BUILTIN[source]))
    return itertools.chain.from_iterable(_file_rows(file) for file in corpus_paths(source))


def corpus_files(directory: Path) -> list[Path]:
    """A directory corpus's files, in name order: every file of a corpus type (of one type
    only); other files (``README.md``, ``dataset_info.json``), hidden ones and subdirectories
    are left alone. A corpus file that cannot be opened (a link to a missing file, as a
    git-annex or hub-cache shard not yet fetched is, or a link loop) is an error, never skipped."""
    entries = sorted(f for f in directory.iterdir() if not f.name.startswith(".") and _kind(f))
    for f in entries:
        if f.is_symlink() and not f.exists():
            reason = "missing"
            try:
                f.stat()
            except OSError as err:
                reason = err.strerror or str(err)
            raise UserError(
                f"shard {f.name} of prompt corpus {directory} cannot be read ({reason}; it is a link to "
                f"{os.readlink(f)!r}): fetch the file it points to (a git-annex or hub-cache shard not yet "
                "downloaded is such a link), or move the link out of the directory"
            )
    files = [f for f in entries if f.is_file()]
    if not files:
        raise UserError(
            f"prompt corpus {directory} is a directory with no corpus file in it ({', '.join(sorted(SUFFIXES))}; "
            "JSONL, CSV and text may be compressed): give the directory that holds the shards, or one file"
        )
    kinds = sorted({_kind(f) for f in files})
    if len(kinds) > 1:
        raise UserError(
            f"prompt corpus {directory} mixes {', '.join(kinds)} files: keep one kind in the directory "
            "(the others may be copies of the same prompts), or give one file"
        )
    return files


def corpus_paths(source: str) -> list[Path]:
    """The files a corpus is read from, in order: the file, or a directory's corpus files; none
    for a built-in corpus."""
    path = Path(source)
    if source in BUILTIN and not path.exists():
        return []
    return corpus_files(path) if path.is_dir() else [path]


def corpus_stamp(source: str) -> tuple | None:
    """Each corpus file's path, size and modification time: what an edit of the corpus changes,
    at the cost of a ``stat`` a file. Empty for a built-in corpus; None when it cannot be read
    (reading it then says why)."""
    try:
        return tuple((str(f), st.st_size, st.st_mtime_ns) for f in corpus_paths(source) for st in [f.stat()])
    except (OSError, UserError):
        return None


def _kind(path: Path) -> str | None:
    """The corpus type a file's name says (None: not a corpus file; Parquet is never compressed outside)."""
    kind = SUFFIXES.get(_suffix(path))
    return None if kind == "parquet" and _compression(path) else kind


def _file_rows(path: Path) -> Iterator[tuple[str, dict]]:
    source = str(path)
    kind = _kind(path)
    known = ", ".join(sorted(SUFFIXES))
    if kind is None:
        if not path.exists():
            raise UserError(
                f"prompt file {source} does not exist: give a file ({known}) or a built-in corpus ({', '.join(BUILTIN)})"
            )
        raise UserError(
            f"prompt file {source} has an unknown type {''.join(path.suffixes[-2:])!r}: use one of {known} "
            f"(JSONL, CSV and text may be compressed: {', '.join(COMPRESSED)})"
        )
    if not path.is_file():
        raise UserError(f"prompt file {source} does not exist: check the path")
    yield from {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "text": _text}[kind](path)


def _compression(path: Path) -> str | None:
    return COMPRESSED.get(path.suffix.lower())


def _suffix(path: Path) -> str:
    """The corpus type's suffix, under a compression suffix if there is one."""
    return (path.with_suffix("") if _compression(path) else path).suffix.lower()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines, decoded (and decompressed); a UTF-8 byte-order mark (Excel's "CSV UTF-8",
    Notepad) is dropped."""
    compression = _compression(path)
    number = 0
    try:
        with (
            io.BufferedReader(pa.input_stream(str(path), compression=compression))
            if compression
            else open(path, "rb") as f
        ):
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{number}: the line is not valid UTF-8: save the file as UTF-8") from None
    except OSError as err:  # only a compressed stream raises it here: truncated, or not that format
        if compression is None:
            raise
        raise UserError(
            f"{path}: cannot decompress it as {compression} at line {number + 1} ({err}): "
            f"check the file is whole and really {compression}, or give it uncompressed"
        ) from None


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        where = f"{path}:{number}"
        if not line.strip():
            raise UserError(f"{where}: blank line in JSONL: remove it (one JSON object a line)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}: invalid JSON ({err.msg} at column {err.colno}): fix or remove the line"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f'{where}: expected a JSON object with a "text" field, got {type(row).__name__}')
        yield where, row


CSV_FIELD_LIMIT = 2**31 - 1
"""csv's default field limit is 128 KiB, and a prompt may be longer (to be cut by --truncate)."""


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.DictReader((line for _, line in _lines(path)), strict=True)
    try:
        if reader.fieldnames is None:
            raise UserError(f'{path} is empty: give a header row with a "text" column, then a prompt a row')
        _need_text(f'{path}: no "text" column in the CSV header {reader.fieldnames}', reader.fieldnames)
        start = reader.line_num + 1  # the line the next row starts on (a quoted field may span lines)
        for row in reader:
            yield f"{path}:{start}", row
            start = reader.line_num + 1
    except csv.Error as err:
        raise UserError(
            f"{path}:{start}: not valid CSV ({err}): quote fields that hold commas, quotes or line breaks, "
            '"like ""this"""'
        ) from None
    finally:
        csv.field_size_limit(limit)


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        file = pq.ParquetFile(path)
    except Exception as err:
        raise UserError(f"{path}: not a readable Parquet file ({err}): write it again") from None
    names = file.schema_arrow.names
    columns = [c for c in names if c in READ or c in COMPUTED or is_extra(c)]  # not pandas' index
    _need_text(f'{path}: no "text" column (columns: {names})', names)
    offset = 0
    for batch in file.iter_batches(batch_size=4096, columns=columns):
        for i, row in enumerate(batch.to_pylist()):
            yield f"{path} row {offset + i}", row
        offset += batch.num_rows


def _text(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        text = line.rstrip("\r\n")
        if text.strip():  # blank lines separate nothing in a text corpus: skip them
            yield f"{path}:{number}", {"text": text}


TEXT_ALIASES = ("prompt", "input", "question", "sentence", "content")
EXPECTED_ALIASES = ("answer", "target", "completion")  # not "label": often a class, not the next token
"""Fields that users name what neuroscan reads as ``text`` or ``expected``: a row that has one
of them instead is refused with the rename, since reading on would lose the prompts or, for
``expected``, the accuracy without a word."""


def _need_text(problem: str, names: list[str]) -> None:
    if "text" not in names:
        alias = next((k for k in TEXT_ALIASES if k in names), None)
        raise UserError(f'{problem}: {f"rename {alias!r} to" if alias else "add"} "text"')


def _to_prompt(prompt_id: int, where: str, row: dict) -> Prompt:
    text = row.get("text")
    pid = row.get("id")
    pid = str(prompt_id) if pid is None or pid == "" else str(pid)
    if text is None:
        alias = next((k for k in TEXT_ALIASES if row.get(k) is not None), None)
        fix = f'rename {alias!r} to "text"' if alias else "add the prompt text"
        raise UserError(f'{where}: prompt {pid!r} has no "text" field: {fix}')
    if "expected" not in row:
        alias = next((k for k in EXPECTED_ALIASES if row.get(k) not in (None, "")), None)
        if alias:
            raise UserError(
                f'{where}: prompt {pid!r} has {alias!r} but no "expected" field, which neuroscan scores '
                f'accuracy with: rename {alias!r} to "expected"'
            )
    if not isinstance(text, str):
        raise UserError(f"{where}: prompt {pid!r} has a non-string text ({type(text).__name__}): quote it")
    if not text.strip():
        raise UserError(f"{where}: prompt {pid!r} is empty or whitespace only: remove it or give it text")
    for key in ("family", "variant", "expected"):
        if isinstance(row.get(key), (list, dict)):
            raise UserError(f"{where}: prompt {pid!r} has a {type(row[key]).__name__} for {key!r}: give one string")
    family, variant, expected = (row.get(k) for k in ("family", "variant", "expected"))
    prompt = Prompt(
        prompt_id=prompt_id,
        id=pid,
        text=text,
        family=None if family in (None, "") else str(family),
        variant=None if variant in (None, "") else str(variant),
        expected=None if expected in (None, "") else str(expected),
        extra={name: extra_value(where, pid, name, value) for name, value in row.items() if is_extra(name)},
    )
    for key in READ:
        _check_unicode(where, pid, key, getattr(prompt, key))
    for key, value in prompt.extra.items():
        if isinstance(value, str):
            _check_unicode(where, pid, key, value)
    return prompt


def _check_unicode(where: str, pid: str, key: str, value: str | None) -> None:
    """JSON may escape half of a UTF-16 surrogate pair (``"\\ud83d"``: an emoji cut in two by
    UTF-16 string slicing); that is no character, and no tokenizer or Arrow file takes it."""
    if value is None or value.isascii():  # a scan, no copy: most text is ASCII, and ASCII holds no surrogate
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(
            f"{where}: prompt {pid!r} has half a surrogate pair ({value[err.start]!r}) in {key!r}, which is no "
            "character: fix the escape where the file was made, or remove it"
        ) from None
