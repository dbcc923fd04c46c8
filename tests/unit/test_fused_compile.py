"""Every Triton kernel compiles for an H100/H200 (sm_90) at the launch configuration it runs with,
on this CPU: Triton lowers to PTX and its bundled ptxas to a cubin without a GPU. The
interpreter tests check what the kernels compute; this checks what only a compiler sees
(types, lowering, layouts), before any GPU time is spent. The compiles run in one subprocess
without ``TRITON_INTERPRET`` (the test session runs the interpreter, which changes how Triton
builds kernels). ptxas's register and spill report is printed (``pytest -s``); where
floating-point contraction would change results, the PTX is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.triton_cpu import needs_triton

pytestmark = needs_triton

ROOT = Path(__file__).resolve().parents[2]


def launches() -> dict[str, tuple]:
    """name -> (kernel, signature, constexprs, options), as `workers.fused` and `workers.rotary` launch them."""
    from workers import fused, rotary

    out = {}
    for act in ("fp16", "bf16", "fp32"):
        tiling = fused.STATS_TILING
        out[f"stats {act}"] = (
            fused.stats_kernel,
            {
                "act": f"*{act}",
                "n_tokens": "*i32",
                **dict.fromkeys(("max_act", "min_act"), "*fp32"),
                **dict.fromkeys(("max_pos", "min_pos", "n_above", "n_below", "n_red", "rank"), "*i32"),
                **dict.fromkeys(("n_neurons", "stride_b", "stride_t"), "i32"),
                **dict.fromkeys(("high", "low", "red", "sel_high", "sel_low"), "fp32"),
            },
            {"BLOCK_T": tiling.block_t, "BLOCK_N": tiling.block_n, "UNROLL": tiling.unroll},
            {"num_warps": tiling.num_warps},
        )
    out["pick"] = (
        fused.pick_kernel,
        {
            "rank": "*i32",
            "neuron": "*i64",
            "n_selected": "*i32",
            **dict.fromkeys(("n_neurons", "k", "unselected"), "i32"),
        },
        {"BLOCK_N": 16_384, "BLOCK_K": 256},
        {"num_warps": fused.PICK_WARPS},
    )
    out["rows"] = (
        fused.rows_kernel,
        {
            "act": "*fp16",
            "n_tokens": "*i32",
            "idx": "*i64",
            **dict.fromkeys(("max_act", "min_act"), "*fp32"),
            **dict.fromkeys(("max_pos", "min_pos", "n_above", "n_below", "n_red"), "*i32"),
            **dict.fromkeys(("o_max_act", "o_min_act"), "*fp32"),
            **dict.fromkeys(("o_max_pos", "o_min_pos", "o_n_above", "o_n_below"), "*i16"),
            "o_n_red": "*i32",
            "bands": "*u8",
            **dict.fromkeys(("n_neurons", "n_slots", "width", "stride_b", "stride_t"), "i32"),
            **dict.fromkeys(("high", "low", "red"), "fp32"),
        },
        {"BLOCK_K": fused.ROWS_BLOCK_K, "BLOCK_W": fused.ROWS_BLOCK_W},
        {},
    )
    for dtype in ("fp16", "bf16", "fp32"):
        out[f"rotary {dtype}"] = (
            rotary.rotary_kernel,
            {
                **dict.fromkeys(("q", "k", "sin", "cos"), f"*{dtype}"),
                **dict.fromkeys(("n_pairs", "stride_x", "stride_head", "stride_sc", "pairs_per_head"), "i32"),
            },
            {"BLOCK": 512},
            rotary.LAUNCH,
        )
    return out


def compile_all() -> None:
    """Compile every launch for sm_90 and print, as JSON, name -> error or PTX facts and ptxas's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (kernel, signature, constexprs, options) in launches().items():
        source = ASTSource(
            fn=triton.jit(kernel),
            signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
            constexprs=constexprs,
        )
        try:
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            continue
        results[name] = {"fma_f32": ptx.count("fma.rn.f32"), "ptxas": ptxas_report(ptx)}
    print(json.dumps(results))


def ptxas_report(ptx: str) -> str:
    """ptxas -v's registers and spills for ``ptx`` ('' when no bundled ptxas reads its version)."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for name in ("ptxas-blackwell", "ptxas"):
            if (folder / name).exists():
                done = subprocess.run(
                    [str(folder / name), "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
                )
                if done.returncode == 0:
                    return " | ".join(
                        line.split("info    : ")[-1].strip()
                        for line in done.stderr.splitlines()
                        if "spill" in line or "registers" in line
                    )
        return ""
    finally:
        os.unlink(f.name)


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", "from tests.unit.test_fused_compile import compile_all; compile_all()"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        print(f"{name:12} {result.get('error') or result['ptxas']}")
    return results


@pytest.mark.parametrize(
    "name", ["stats fp16", "stats bf16", "stats fp32", "pick", "rows", "rotary fp16", "rotary bf16", "rotary fp32"]
)
def test_kernel_compiles_for_sm90(compiled, name):
    assert "error" not in compiled[name], compiled[name]["error"]


def test_rotary_kernel_has_no_fused_multiply_add(compiled):
    """transformers rounds each product before the sum; a contracted a * b - c * d (one FMA)
    would differ in float32, so the kernel is launched with contraction off."""
    assert compiled["rotary fp32"]["fma_f32"] == 0
