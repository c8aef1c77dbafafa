#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, build (CUDA kernels compiled and
# linked when nvcc is present), C++ tests through ctest, then pytest (Triton kernels run
# under TRITON_INTERPRET=1 when there is no GPU) -- all on the newest supported torch
# (requirements-dev.txt). Then the op tests on the oldest supported torch, in a venv of their
# own (scripts/test_oldest_torch.sh; TEST_OLDEST_TORCH=0 skips it). Arguments go to the first
# pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"

python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-build-isolation -e .
python -c "import exgramed_kernels as ek; assert ek.HAS_EXTENSION, 'extension not built'"

prefix=$(python -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda -DCUDAToolkit_ROOT=/usr/local/cuda \
  -DCUDA_nvrtc_LIBRARY="$(python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13/lib/libnvrtc.so.13'))" 2>/dev/null || true)"
cmake --build build/cmake -j "$MAX_JOBS"
ctest --test-dir build/cmake --output-on-failure

python -m pytest tests -q -p no:cacheprovider "$@"
echo "== newest torch ($(python -c 'import torch; print(torch.__version__)')): $SECONDS s"

if [[ "${TEST_OLDEST_TORCH:-1}" != 0 ]]; then
  t0=$SECONDS
  bash scripts/test_oldest_torch.sh
  echo "== oldest torch: $((SECONDS - t0)) s"
fi
