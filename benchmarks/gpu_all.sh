#!/usr/bin/env bash
# Everything issue 22 measures on a GPU, in one go, in under ~8 minutes on one H100/H200-class GPU:
#   1. the GPU-only tests (tests/training/test_device.py: a bf16 flash-attention/fused-AdamW step, the
#      measured bf16 peak, `lmforge train --device cuda` resumed exactly, every application verb on CUDA
#      against the CPU; tests/serve/test_serve.py: serve --device cuda), which skip on CPU;
#   2. benchmarks/gpu_train.py: GPT-2 124M and a 1.1B Llama, tokens/s and MFU vs a nanoGPT-style peer
#      (results/gpu_train.json, written row by row, so a timeout keeps the rows it finished);
#   3. benchmarks/inference.py --device cuda: SmolLM2 prefill/decode vs transformers (results/inference_cuda.json).
#
#   bash benchmarks/gpu_all.sh               # PYTHON=/path/to/python to choose the interpreter
#
# It needs a CUDA build of torch (`make setup` installs the CPU one) and, for the inference peer,
# transformers; it uses the first of $PYTHON, .venv/bin/python, python3 that sees a GPU.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "skipped: no CUDA device (or no CUDA build of torch in \$PYTHON, .venv/bin/python, python3)"
    exit 0
fi
"$python" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

status=0
step() {  # step SECONDS COMMAND...: run it under a time limit, remember a failure, go on
    local seconds=$1
    shift
    echo "== $* (limit ${seconds}s)"
    local started=$SECONDS
    timeout "$seconds" "$@" || { echo "!! failed or timed out: $*"; status=1; }
    echo "== took $((SECONDS - started))s"
}
step 240 "$python" -m pytest -q -p no:cacheprovider tests/training/test_device.py tests/serve/test_serve.py -k "cuda or device"
step 300 "$python" benchmarks/gpu_train.py --steps 20
step 150 "$python" benchmarks/inference.py --device cuda --rounds 2
exit $status
