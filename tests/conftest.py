import atexit
import os
import shutil
import tempfile

# A fresh Inductor/AOTAutograd cache per test session (unless one is set): the cache is keyed on the
# traced graph, and an exgramed composite op (align) appears there as one call, so a cache filled by
# another version of this package would serve that version's compiled code.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="exgramed-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

# Triton reads this when it is imported: without a GPU, interpret its kernels on the CPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


# scripts/gpu_check.sh runs the tests in several xdist workers: a CUDA error (an illegal address, say)
# leaves its process's CUDA context unusable, so after the test that raised it the worker exits and
# xdist starts a fresh one, instead of every later test in that worker failing the same way.
if os.environ.get("EXGRAMED_TEST_EXIT_ON_CUDA_ERROR") == "1":
    import pytest  # noqa: E402

    _CUDA_ERROR_MARKS = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure")
    _cuda_broken = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        rep = outcome.get_result()
        if rep.failed and any(m in str(rep.longrepr) for m in _CUDA_ERROR_MARKS):
            _cuda_broken.append(item.nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        yield
        if _cuda_broken:
            import sys
            import time

            print(f"\nCUDA context broken by {_cuda_broken[0]}: this worker exits", file=sys.stderr)
            time.sleep(1)  # let xdist send the failing test's report first
            os._exit(3)
