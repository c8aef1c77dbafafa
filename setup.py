"""Build exgramed_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Environment switches
  EXGRAMED_FORCE_CUDA=1   build the CUDA kernels even if detection says no (fails loudly without nvcc)
  EXGRAMED_FORCE_CPU=1    build the CPU kernels only
  EXGRAMED_NO_EXTENSION=1 install the pure-Python package (every op runs the PyTorch reference)
  TORCH_CUDA_ARCH_LIST    CUDA targets (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS                parallel compile jobs (read by torch's builder)
  CUDA_HOME               toolkit root; otherwise /usr/local/cuda or the real path of nvcc is used
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit root that really holds the CUDA headers.

    torch's builder guesses from the location of `nvcc`; where `nvcc` on PATH is a
    wrapper script (as /usr/local/bin/nvcc here) that guess is wrong, so look for
    include/cuda_runtime.h ourselves.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")) and os.path.isfile(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


def _extensions():
    if _flag("EXGRAMED_NO_EXTENSION"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils import cpp_extension

    use_cuda = not _flag("EXGRAMED_FORCE_CPU") and (
        _flag("EXGRAMED_FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None)
    )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = ["csrc/python_module.cpp", "csrc/exgramed.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: every operation rounds as written, no fused multiply-add, so the results are the
    # same bits on every x86-64 CPU and at every position of a vectorised loop (csrc/cpu/multiversion.h).
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", "-DEXGRAMED_PYTHON_MODULE"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("EXGRAMED_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        "exgramed_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "exgramed_kernels")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        # libstdc++ as a shared library, even where the compiler driver links it statically (the GPU
        # machines' /opt/gcc wrapper does): torch already holds the shared one, and a second, static copy
        # inside _C crashed every error message that formats a number (std::ostream on its locale).
        extra_link_args=["-fopenmp", "-Wl,--push-state,--no-as-needed,-Bdynamic", "-lstdc++", "-Wl,--pop-state"],
    )
    print(f"exgramed: building _C with {'CPU+CUDA (' + cuda_home + ')' if use_cuda else 'CPU only'} kernels")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _requirements(name):
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith(("#", "-"))]


ext_modules, cmdclass = _extensions()

setup(
    name="exgramed",
    version="0.1.0",
    description="Batched kNN-graph, GraphConv, linear-assignment and graph-matching kernels for ExGra-Med",
    packages=find_packages(include=["exgramed_kernels*", "exgramed_train*"]),
    package_data={
        "exgramed_kernels": ["schemas.def"],
        "exgramed_train": [
            "README.md",
            "assets/demo/*.json",
            "assets/demo/tokenizer/*.json",
            "assets/demo/images/*.png",
            "assets/demo/images/*.dcm",
        ],
    },
    python_requires=">=3.10",
    # The torch versions CI tests: the oldest on the op tests (scripts/test_oldest_torch.sh), the newest on all.
    install_requires=["torch>=2.11,<2.15", "numpy"],
    extras_require={"triton": ["triton"], "train": _requirements("requirements-train.txt")},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
