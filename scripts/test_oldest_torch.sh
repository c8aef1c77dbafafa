#!/usr/bin/env bash
# The op tests on the oldest supported torch (requirements-oldest-torch.txt): a venv of its own, the
# extension built CPU-only in a copy of the tree (an extension built for one torch does not load in
# another, so the in-tree build of scripts/test.sh stays untouched), then tests/ except tests/train.
# Everything lives under build/oldest-torch/ (OLDEST_TORCH_DIR); a second run reuses the venv and
# recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"
dir="${OLDEST_TORCH_DIR:-$PWD/build/oldest-torch}"
venv="$dir/venv" src="$dir/src"
PY="${PYTHON:-python3}"

t0=$SECONDS
[[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q -r requirements-oldest-torch.txt
echo "oldest torch: $("$venv/bin/python" -c 'import torch; print(torch.__version__)') installed in $((SECONDS - t0)) s"

# The tree as it is now (tracked and untracked, not ignored files); the copy's build/ is kept.
mkdir -p "$src"
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src"

cd "$src"
t0=$SECONDS
EXGRAMED_FORCE_CPU=1 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import exgramed_kernels as ek; assert ek.HAS_EXTENSION, 'extension not built'"
echo "oldest torch: CPU build in $((SECONDS - t0)) s"

"$venv/bin/python" -m pytest tests -q -p no:cacheprovider --ignore=tests/train "$@"
