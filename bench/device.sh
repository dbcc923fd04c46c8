#!/usr/bin/env bash
# One call on the lent GPU machine (device tool): Ray's wheels, the GPU tests, the benchmark
# of record. Everything it writes lands in $OUT. Build .whl/ first, here:
#   bench/device-wheels.sh
# then run this with carry [".whl"], e.g.
#   AGGREGATE=1 KERNELS=1 PROFILE=1 PROMPTS=2048 MODES=bare,bare_hf_rotary,scan_local_inline,scan_local,bare_again,scan,scan_2stage,scan_2stage_direct bash bench/device.sh
# transformers is carried because the machine's own (5.17) runs GPT-J's attention eagerly in
# fp32; from the version this repository is tested with, GPT-J uses PyTorch's SDPA. If the
# carried one does not import there, the machine's own is used (gpu.txt says which).
set -uo pipefail
OUT=${OUT:-/tmp/neuroscan-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import transformers.models.gptj.modeling_gptj" 2>"$OUT/transformers-import.log"; then
  echo "carried transformers does not import here (see transformers-import.log): using the machine's own"
  rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton, ray, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$OUT/gpu.txt"
# Every step runs under min(its own limit, what is left of BUDGET), in order of worth: the GPU
# tests, the benchmark of record, then the diagnostics. A slow step cannot starve the bench;
# a step with under 20 s left is skipped (and says so). Give the call's timeout_s ~30 s more.
BUDGET=${BUDGET:-540}
step() {  # step NAME LIMIT COMMAND...: run COMMAND under a timeout; its output goes to $OUT/NAME.log
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) t0=$SECONDS rc; shift 2
  if ((left < 20)); then echo "== $name: skipped, ${left}s of BUDGET left" | tee "$OUT/$name.log"; return; fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s$( ((rc == 124)) && echo ', timed out')" | tee -a "$OUT/$name.log"
}
step gpu-tests "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/gpu --ignore tests/gpu/test_handoff_gpu.py \
  --ignore tests/gpu/test_tensor_parallel_gpu.py
tail -25 "$OUT/gpu-tests.log"
PRESET=${PRESET:-gptj-6b}  # or pythia-6.9b, llama-3-8b, gpt2-xl: each family's benchmark of record
step bench "${BENCH_TIMEOUT:-420}" python3 -m cluster.cli bench --device cuda --preset "$PRESET" --prompts "${PROMPTS:-512}" \
  --prompt-tokens 256 --batch-tokens 8192 --cache /tmp/neuroscan-bench --out "$OUT/bench.json" ${MODES:+--modes "$MODES"} \
  ${TP:+--tensor-parallel "$TP"}
tail -40 "$OUT/bench.log"
if [ -n "${KERNELS:-}" ]; then
  step kernels 120 python3 -m bench.kernels
  tail -30 "$OUT/kernels.log"
fi
# The direct hand-off through Ray (CUDA IPC between two stages on the GPU) and, on a machine of two
# GPUs or more, --tensor-parallel 2 over NCCL: in their own process and Ray.
step gpu-handoff "${HANDOFF_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/gpu/test_handoff_gpu.py tests/gpu/test_tensor_parallel_gpu.py
tail -5 "$OUT/gpu-handoff.log"
if [ -n "${PROFILE:-}" ]; then
  step profile 120 python3 -m bench.profile "/tmp/neuroscan-bench/$PRESET-seed0-cuda"
  grep "^== " "$OUT/profile.log"
fi
if [ -n "${AGGREGATE:-}" ]; then  # the aggregator's pace alone, on this machine's CPUs
  step aggregate 90 python3 -m bench.aggregate /tmp/neuroscan-aggregate --batches 32
  tail -3 "$OUT/aggregate.log"
fi
