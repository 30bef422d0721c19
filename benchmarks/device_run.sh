#!/usr/bin/env bash
# The one prepared command for a session lent a GPU (the `device` tool's `run`, with carry [".whl"] and a
# timeout_s of about 420; extra arguments go to matmul_gpu.py): every backend checked on the device, the
# kernel's tiles swept, everything timed host-side and on the device, results under $OUT. Qwix travels as
# a wheel in .whl/ (git-ignored; see /work/.library/device/README.md); without it the Qwix rows say
# "unavailable". Next runs (session 20's changes, built offline and never run on a GPU):
#   1. `--quick-checks --lean --m 1 5 16 256 --no-sweep --no-llama` (BUDGET=150): the PTX dot masking the
#      rows past M, and auto's dequant over the Pallas decoding kernel past 128 rows, checked then timed;
#   2. `--tma --kernels --m 1 16 64 --sweep-m 1` (BUDGET=240): matmul_nt reading its scales and a few
#      activation rows in place, and its warp-specialized pipeline (tma_nt_ws);
#   3. `--probes-only --no-checks`: the TMA pipeline probes, what holds matmul_nt at 2.1 TB/s.
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}" name="${NAME:-matmul_gpu}"  # NAME: the output files' stem
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 benchmarks/matmul_gpu.py --budget "${BUDGET:-330}" --quick-checks --out "$out/$name.json" "$@" 2>&1 | tee "$out/${name}_run.log"
