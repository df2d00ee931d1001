#!/usr/bin/env bash
# On a CUDA machine: the triton backend's GPU conformance tests, then the benchmark table.
#   benchmarks/gpu_check.sh                 # everything (tests, then bf16/fp16 x D 64/128 x N 1k..16k)
#   QUICK=1 benchmarks/gpu_check.sh         # tests, then a short benchmark (bf16, D=128, N 4k/16k)
# Extra arguments go to benchmarks/gpu_bench.py. Needs torch with CUDA, triton and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"; print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)'
# Tuning every head dim the tests visit would compile dozens of configs: tests use the defaults.
QKV_TRITON_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/test_triton.py -p no:cacheprovider ${PYTEST_ARGS:-}
if [[ "${QUICK:-0}" != "0" ]]; then
  python3 benchmarks/gpu_bench.py --dtypes bf16 --head-dims 128 --lengths 4096 16384 "$@"
else
  python3 benchmarks/gpu_bench.py "$@"
fi
