#!/usr/bin/env bash
# The GPU check (one H200, torch 2.11 + CUDA 13.0, Python 3.12, triton 3.6, no network), in one go,
# in 8 minutes: build the extension for sm_90, run the CUDA and Triton tests against the reference,
# measure the GPU targets (benchmarks/gpu_targets.py), then time every op through the benchmark harness (`python -m benchmarks.report
# --device cuda`: ours on CUDA and Triton against the peers and the floors, the alignment's overhead in
# bf16 first; sizes past the time budget are skipped and listed). Everything lands in $OUT (default
# /tmp/gpu_check):
#   gpu_check.log       this script's whole output (build tail, test summary, timing lines)
#   versions.txt        python, the torch the extension is built against (whatever $PYTHON imports) and
#                       its path, CUDA, triton, nvcc
#   build.log           the full compiler output
#   pytest.log          the full test output (junit-less: -rfE lists failures and errors)
#   results/cuda_targets.json  the GPU targets measured directly, and whether an align step captures in a CUDA
#                       graph (python -m benchmarks.gpu_targets)
#   results/cuda.json   the figures (copy to benchmarks/results/ and run `python -m benchmarks.report --render`)
#   RESULTS.md          the report of that run alone
# Without a GPU (or with GPU_CHECK_DRY=1) the same steps run as a dry run: the real build, the same
# test selection (Triton through its interpreter), and the harness on the CPU at tiny sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
LIMIT="${GPU_CHECK_LIMIT:-480}"   # seconds for the whole script
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONPATH="$PWD:${PYTHONPATH:-}"
left() { echo $(( LIMIT - SECONDS )); }

# A GPU machine without a package registry: the peers it lacks (lap, torch-linear-assignment) come as wheels
# in .whl/, downloaded elsewhere with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 -d .whl lap torch-linear-assignment`.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site" && echo "wheels installed: $(ls .whl | tr '\n' ' ')"
fi

gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
dry=0
if [[ "$gpu" != 1 || "${GPU_CHECK_DRY:-0}" == 1 ]]; then dry=1; fi
echo "== gpu_check $(date -u +%FT%TZ) dry_run=$dry OUT=$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
{
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import os, torch; print('torch at', os.path.dirname(torch.__file__))"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
} | tee "$OUT/versions.txt"

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
t0=$SECONDS
EXGRAMED_FORCE_CUDA=1 timeout "${GPU_CHECK_BUILD_LIMIT:-270}" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
tail -n 3 "$OUT/build.log"
echo "build rc=$build_rc in $(( SECONDS - t0 )) s; C++ runtime: $(ldd exgramed_kernels/_C*.so 2>/dev/null | grep -oE "libstdc\+\+[^ ]*|libgcc_s[^ ]*" | sort -u | tr '\n' ' ')"
$PY - <<'EOF'
import torch, exgramed_kernels as ek
from exgramed_kernels.testing import has_kernel
ops = ["knn_graph", "graph_conv_forward", "graph_conv_backward", "graph_conv_stacked", "linear_assignment", "qap_solve", "qap_gradient", "pair_scores", "pair_scores_backward", "edge_sq_norms", "edge_sq_norms_backward"]
print("extension:", ek.HAS_EXTENSION, "| CUDA kernels:", {op: has_kernel(op, "CUDA") for op in ops})
EOF
if [[ $build_rc != 0 ]]; then echo "BUILD FAILED (see $OUT/build.log)"; grep -m 20 -i "error" "$OUT/build.log"; fi

echo "== tests: CUDA and Triton against the reference"
t0=$SECONDS
tests_limit=$(( $(left) - 200 )); (( tests_limit > 150 )) && tests_limit=150; (( tests_limit < 30 )) && tests_limit=30
# Several workers when pytest-xdist is there; a worker whose CUDA context breaks exits after the failing
# test (tests/conftest.py), and kernel launches are synchronous so an error names the op that made it.
xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n ${GPU_CHECK_TEST_WORKERS:-6}"
EXGRAMED_TEST_EXIT_ON_CUDA_ERROR=1 CUDA_LAUNCH_BLOCKING=1 timeout "$tests_limit" \
  $PY -m pytest tests -v -p no:cacheprovider --ignore=tests/train -rfE $xdist \
  -k "cuda or triton or CUDA or libstdcxx" > "$OUT/pytest.log" 2>&1
test_rc=$?
# -v: each result as it comes, so a run cut off by its time limit still names its failures
grep -oE "(FAILED|ERROR) tests/[^ ]*" "$OUT/pytest.log" | sort -u | head -n 30
test_summary="$(grep -cE "PASSED tests/" "$OUT/pytest.log") passed; last line: $(tail -n 1 "$OUT/pytest.log" | cut -c1-160)"
echo "tests rc=$test_rc in $(( SECONDS - t0 )) s: $test_summary"
(( test_rc == 124 )) && echo "TESTS TIMED OUT after $tests_limit s (raise GPU_CHECK_LIMIT or run them alone)"

echo "== the GPU targets, and CUDA-graph capture of one align training step"
if [[ $dry == 0 ]]; then
  timeout 120 $PY -m benchmarks.gpu_targets --out "$OUT"
  targets_rc=$?
else
  echo "(dry run: no GPU)"; targets_rc=0
fi

echo "== timing"
budget=$(( $(left) - 60 )); (( budget < 20 )) && budget=20
ops=overhead,linear_assignment,knn_graph,graph_conv,pair_scores,qap_solve,align,global_align
if [[ $dry == 1 ]]; then
  TRITON_INTERPRET=1 timeout $(( budget + 120 )) $PY -m benchmarks.report --tiny --ops "$ops" --out "$OUT" --budget "$budget"
else
  timeout $(( budget + 50 )) $PY -m benchmarks.report --device cuda --ops "$ops" --out "$OUT" --budget "$budget"
fi
timing_rc=$?
# At most 8 files come back from the device: the plots are redrawn from results/cuda.json by --render.
rm -f "$OUT"/results/*.png "$OUT"/*.png
echo
echo "== gpu_check done in $SECONDS s: build rc=$build_rc, tests rc=$test_rc ($test_summary), targets rc=$targets_rc, timing rc=$timing_rc"
exit $(( build_rc != 0 || test_rc != 0 || targets_rc != 0 || timing_rc != 0 ))
