"""A corpus's extra columns: what a prompt file holds beyond the fields neuroscan reads.

Every column of a JSONL, CSV or Parquet corpus other than ``text``, ``id``, ``family``,
``variant`` and ``expected`` (``topic``, ``source``, ``difficulty``...) is carried into
``prompts/`` as a column of its own, after neuroscan's columns, so that an analysis groups
by it without a join (``neuroscan compare --by topic``). A column's type is decided once,
from every value of the whole corpus (the scan's plan reads it all before anything starts),
so every part of ``prompts/`` has the same schema: a column that is null in one micro-batch
and an integer in the next is an integer in both.

- only booleans: ``bool``; only integers: ``int64``; integers and floats: ``float64``;
- anything else (strings, a mix of kinds): ``string``, with what is not a string written
  as JSON text (``true``, ``7``); a column that never holds a value: ``string``.

Lists and objects are JSON text as they are read, integers beyond int64 and other values
(Parquet dates, decimals) their ``str``; all of them make the column a ``string``. CSV has no
types: its columns are strings. An empty value (``""``, an empty CSV cell) is null, as for
``family``. A column without a name (the index pandas writes into a CSV, or into Parquet as
``__index_level_0__``) is left out. A column named like one neuroscan computes
(``prompt_id``, ``tokens``, ``correct``...) is refused with one line: rename it in the corpus.
In pandas an ``int64`` column with nulls reads as floats, as pandas reads any such column.
"""

from __future__ import annotations

import json

import pyarrow as pa

from neuroscan.errors import UserError
from neuroscan.schema import ACTIVATIONS, LAYERS, PROMPTS

READ = ("text", "id", "family", "variant", "expected")
"""The corpus fields neuroscan reads itself."""
COMPUTED = tuple(name for name in PROMPTS.names if name not in READ)
"""The columns of ``prompts/`` that neuroscan computes: no extra column may take their names."""
JOINED = tuple(dict.fromkeys(n for n in (*ACTIVATIONS.names, *LAYERS.names) if n not in PROMPTS.names))
"""The columns of ``activations/`` and ``layers/``, which a prompt's fields are joined to
(`results.run.Run`): no extra column may take their names either."""

INT64 = (-(2**63), 2**63)


def extra_value(where: str, pid: str, name: str, value: object) -> bool | int | float | str | None:
    """One extra field's value as ``prompts/`` stores it: a scalar, or the JSON text (or
    ``str``) of anything else; None for an empty value. A computed column's name is refused."""
    if name in COMPUTED or name in JOINED:
        table, names = ("prompts/", COMPUTED) if name in COMPUTED else ("activations/ and layers/", JOINED)
        raise UserError(
            f"{where}: prompt {pid!r} has a column {name!r}, which neuroscan writes itself in {table} "
            f"({', '.join(names)}): rename it in the corpus, e.g. to 'corpus_{name}'"
        )
    if value is None or value == "":
        return None
    if isinstance(value, (bool, float, str)) or (isinstance(value, int) and INT64[0] <= value < INT64[1]):
        return value
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def is_extra(name: object) -> bool:
    """Whether a corpus column is an extra one (not read by neuroscan, and named)."""
    return (
        isinstance(name, str)
        and name not in READ
        and bool(name.strip())
        and not name.startswith("__index_level_")  # pandas' index, written into Parquet
    )


class ColumnTypes:
    """The extra columns seen, in first-seen order, and the kinds of value each held."""

    def __init__(self) -> None:
        self.kinds: dict[str, set[type]] = {}

    def see(self, extra: dict[str, object]) -> None:
        for name, value in extra.items():
            kinds = self.kinds.setdefault(name, set())
            if value is not None:
                kinds.add(type(value))

    def types(self) -> dict[str, str]:
        """Column name -> Arrow type name (``pyarrow.type_for_alias``), as the module says."""
        return {name: _type(kinds) for name, kinds in self.kinds.items()}


def _type(kinds: set[type]) -> str:
    if kinds == {bool}:
        return "bool"
    if kinds == {int}:
        return "int64"
    if kinds and kinds <= {int, float}:
        return "float64"
    return "string"


def extra_array(values: list, arrow_type: pa.DataType) -> pa.Array:
    """One extra column of a micro-batch's prompts (values from `extra_value`) as ``arrow_type``."""
    if pa.types.is_string(arrow_type):
        values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    return pa.array(values, type=arrow_type)
