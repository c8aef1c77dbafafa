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
