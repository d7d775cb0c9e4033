#!/usr/bin/env bash
# GPU check of the trainer's fused Triton kernels and of one short training run, on a machine
# with one NVIDIA GPU, PyTorch, Triton and transformers (no vLLM, no internet needed). At most
# 8 minutes: every step has its own timeout (15 + 15 + 15 + 150 + 30 + 95 + 130 s, plus 5 s
# grace each). The services' and trainer's other packages come as wheels in .whl/
# (`bash bench/gpu_wheels.sh` where PyPI is reachable, then carry .whl/ along); they are
# installed into /tmp/site first. Results go to one folder, ${OUT:-gpu_check_out}:
#
#   env.txt                       nvidia-smi, python, torch, triton versions
#   1_kernel_tests.txt            pytest tests/test_kernel.py tests/test_linear_logprob.py,
#                                 compiled (TRITON_INTERPRET unset) on CUDA tensors; the CPU cases
#                                 run interpreted in the tests' own subprocess
#   2a_bench_opd_loss.txt         bench/kernels.py opd-loss (bf16, without torch.compile to fit the
#                                 time), bandwidth vs the device peak
#   2b_bench_linear_logprob.txt   bench/kernels.py linear-logprob at V = 151936, H = 1536 (bf16),
#                                 N = 8k, 32k, 64k: triton vs chunked (and Liger / CCE if installed)
#   3_opd_train.txt               bench/gpu_train_check.py: `python -m trainer` for 3 steps on CUDA
#                                 against hf teacher and rollout services on the same GPU, random
#                                 models of Qwen2.5-0.5B's shape, bf16 autocast, 8 x 4 x 128 tokens;
#                                 per-step timing (run dir and service logs in 3_opd_train/)
#   summary.txt                   one line per step
#
# Usage: bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT" || exit 1
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
unset TRITON_INTERPRET OPD_LOSS_BACKEND OPD_LOGPROB_BACKEND
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/wheels.txt" 2>&1 || { cat "$OUT/wheels.txt"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME TIMEOUT_S CMD...: the command's stdout+stderr to $OUT/NAME.txt, a summary line.
run() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo "== $name: $* (timeout ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    note "$(printf '%-28s %-22s %4ss  %s' "$name" "$status" "$(($(date +%s) - t0))" "$OUT/$name.txt")"
    return $rc
}

# ---- 0. is there a GPU?
timeout 15 bash -c '
    echo "date: $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$0" -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda)"
    "$0" -c "import triton; print(\"triton\", triton.__version__)"
' "$PYTHON" >"$OUT/env.txt" 2>&1
if ! timeout 15 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >>"$OUT/env.txt" 2>&1; then
    note "no CUDA GPU detected (torch.cuda.is_available() is False, or torch failed to import):"
    note "nothing to check here; this script needs one NVIDIA GPU. See $OUT/env.txt"
    exit 2
fi
note "GPU: $(timeout 15 "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>&1 | tail -1)"

# ---- 1. kernel tests, compiled
run 1_kernel_tests 150 "$PYTHON" -m pytest -v -p no:cacheprovider \
    tests/test_kernel.py tests/test_linear_logprob.py
cuda_passed=$(grep -c '\[cuda.* PASSED' "$OUT/1_kernel_tests.txt")
if [ "$cuda_passed" -gt 0 ]; then
    note "    CUDA test cases passed: $cuda_passed"
else
    note "    FAILED: no CUDA test case passed (the tests did not run on the GPU)"
fi
grep -E '^(FAILED|ERROR)' "$OUT/1_kernel_tests.txt" | head -20 | sed 's/^/    /' | tee -a "$SUMMARY"

# ---- 2. benchmarks (bandwidth / flops against the device's vendor peak)
run 2a_bench_opd_loss 30 "$PYTHON" bench/kernels.py opd-loss --device cuda \
    --sizes 64k,1M,8M --dtype bf16 --no-compile --markdown
run 2b_bench_linear_logprob 95 "$PYTHON" bench/kernels.py linear-logprob --device cuda \
    --v 151936 --h 1536 --n 8k,32k,64k --dtype bf16 --warmup 1 --repeat 5 --markdown
grep -E '^# .*(skipped|failed)' "$OUT/2b_bench_linear_logprob.txt" | sed 's/^/    /' | tee -a "$SUMMARY"

# ---- 3. a short `opd train` on CUDA (hf services on the same GPU)
run 3_opd_train 130 "$PYTHON" bench/gpu_train_check.py --out "$OUT/3_opd_train" --device cuda \
    --steps 3 --ready-timeout 60
grep -E '^(\||median|models built)' "$OUT/3_opd_train.txt" | sed 's/^/    /' | tee -a "$SUMMARY"

echo
echo "summary ($SUMMARY):"
cat "$SUMMARY"
