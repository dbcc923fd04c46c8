#!/usr/bin/env bash
# Build .whl/ for bench/device.sh: Ray (../shared/tools/device-wheels.sh), transformers 5.24
# (GPT-J's SDPA attention; the machine has 5.17), DeepSpeed (--tensor-parallel) and the bench peers with the dependencies the
# machine lacks. Everything carried with a call must stay under 64 MiB, so Ray's wheel also
# loses its dashboard web client and RLlib (neither is imported by a scan).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
../shared/tools/device-wheels.sh transformers==5.24.0 transformer-lens==4.3.0 nnsight==0.8.1 datasets dill multiprocess \
  beartype typeguard fancy-einsum wadler-lindig pydantic pydantic-core annotated-types typing-inspection greenlet websocket-client \
  hjson msgpack ninja py-cpuinfo einops
# DeepSpeed is on PyPI as source only: its wheel is pure Python (none of its kernels is built).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
whl=$(ls "$PWD"/.whl/ray-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$whl" -x 'ray/dashboard/client/build/*' 'ray/rllib/*' \
  && grep -v -e '^ray/dashboard/client/build/' -e '^ray/rllib/' ray-*.dist-info/RECORD > R && mv R ray-*.dist-info/RECORD \
  && rm -f "$whl" && zip -q -r -9 "$whl" .)
rm -rf "$tmp"
du -sh .whl
