"""Whether the fused Triton kernels can be tested here: on a GPU, or on the CPU under Triton's
interpreter (switched on in tests/conftest.py before anything imports triton)."""

from __future__ import annotations

import importlib.util

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]' brings it)")
