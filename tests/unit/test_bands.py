"""neuroscan.bands: decoding the bands column, one value or a whole column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from neuroscan import bands


def _pack(codes: list[int]) -> bytes:
    padded = codes + [0] * (-len(codes) % 4)
    return bytes(sum(c << (2 * i) for i, c in enumerate(padded[j : j + 4])) for j in range(0, len(padded), 4))


ROWS = [[3, 2, 1, 0, 1], [0], [2, 2, 2, 2, 2, 2, 2, 2, 3], []]


def test_one_value_and_a_column_decode_to_the_codes_packed(monkeypatch):
    blobs = [_pack(codes) for codes in ROWS]
    n = [len(codes) for codes in ROWS]
    for blob, codes in zip(blobs, ROWS):
        assert bands.decode(blob, len(codes)).tolist() == codes
    monkeypatch.setattr(bands, "CHUNK", 9)  # a row at a time: chunking changes nothing
    for column in (
        blobs,
        pa.array(blobs),
        pa.chunked_array([blobs[:2], blobs[2:]]),
        pa.array(blobs, pa.large_binary()),
    ):
        got = bands.decode_many(column, n)
        assert got.shape == (4, 9) and got.dtype == np.int8
        assert [row[row >= 0].tolist() for row in got] == ROWS
        assert (got[0, 5:] == -1).all() and (got[3] == -1).all()


def test_a_slice_reads_its_own_rows():
    column = pa.array([_pack(codes) for codes in ROWS]).slice(1, 2)
    assert [r[r >= 0].tolist() for r in bands.decode_many(column, [1, 9])] == ROWS[1:3]
    assert bands.decode_many(pa.array([], pa.binary()), []).shape == (0, 0)


def test_fewer_codes_than_tokens_is_refused():
    with pytest.raises(ValueError, match="fewer tokens than its n_tokens"):
        bands.decode_many([_pack([1, 1])], [5])
    with pytest.raises(ValueError, match="2 bands values but 1 token counts"):
        bands.decode_many([b"", b""], [0])
    assert bands.NAMES[3] == "red"
