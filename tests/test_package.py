"""The package's shape: no import cycles, one file per op, the alignment's defaults written once, and the
documented --align-option examples valid."""
import ast
import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import _backend, reference
from exgramed_kernels.config import DEFAULTS, FIELDS, OFFICIAL, OP_FIELDS, AlignConfig, parse_option
from exgramed_kernels.distributed import global_align

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "exgramed_kernels"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("exgramed_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("exgramed_kernels"):
                continue
            for a in node.names:  # "from . import reference" imports a module
                sub = f"{mod}.{a.name}"
                out.add(sub if (ROOT / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (ROOT / sub.replace(".", "/") / "__init__.py").exists() else mod)
    return out


@pytest.mark.skipif(not ek.HAS_EXTENSION, reason="the compiled extension is not built")
def test_extension_links_the_shared_libstdcxx():
    """_C loads the shared libstdc++ that torch also loads, even where the compiler driver links libstdc++
    statically (setup.py): a second, static copy crashed every error message that formats a number."""
    import exgramed_kernels._C as C

    deps = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in deps, deps


def test_no_import_cycles_in_the_package():
    graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in PKG.rglob("*.py")}
    state, stack = {}, []

    def visit(m):
        state[m] = "active"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.rsplit(".", 1)[0] == m:  # a package importing its own submodules (its exports)
                continue
            if state.get(d) == "active":
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 20  # the walk saw the package


def test_one_file_per_op_in_each_layer():
    """Every op with a compiled kernel has its Python module, and its kernel files are named by it."""
    ops = set(_backend.schemas())
    # internal ops live in the file of the op they serve
    served = {"graph_conv_forward": "graph_conv", "graph_conv_backward": "graph_conv",
              "graph_conv_stacked": "graph_conv", "pair_scores_backward": "pair_scores",
              "pair_scores_backward_sparse": "pair_scores", "edge_sq_norms_backward": "edge_sq_norms",
              "qap_solve_lockstep": "qap_solve", "edge_pair_indicator_sparse": "edge_pair_indicator"}
    for op in ops:
        home = served.get(op, op)
        assert (PKG / f"{home}.py").exists(), op
        text = (PKG / f"{home}.py").read_text()
        assert any(ref in text for ref in (f'"exgramed::{op}"', f'"{op}"', f"ops.exgramed.{op}(")), op
    for cpp in (ROOT / "csrc" / "cpu").glob("*_cpu.cpp"):
        for op in re.findall(r'm\.impl\("(\w+)"', cpp.read_text()):
            assert cpp.stem == f"{op}_cpu" or cpp.stem == f"{served.get(op, op)}_cpu", (cpp.name, op)
    for cu in (ROOT / "csrc" / "cuda").glob("*_cuda.cu"):
        for op in re.findall(r'm\.impl\("(\w+)"', cu.read_text()):
            assert cu.stem in (f"{op}_cuda", f"{served.get(op, op)}_cuda") or op == "qap_solve_lockstep", (cu.name, op)


def test_align_defaults_are_the_configuration():
    # the op's schema
    schema = torch.ops.exgramed.align.default._schema
    defaults = {a.name: a.default_value for a in schema.arguments if a.name in OP_FIELDS}
    assert set(defaults) == set(OP_FIELDS)
    for name in OP_FIELDS:
        assert defaults[name] == getattr(DEFAULTS, name), name
    # the Python entry points take options by name and restate none of them
    for fn in (ek.align, reference.align, global_align):
        params = inspect.signature(fn).parameters
        assert not set(params) & set(FIELDS), (fn.__qualname__, set(params) & set(FIELDS))
        assert "config" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())
    # the module
    assert ek.MultiGraphAlignment(8).config == DEFAULTS
    assert ek.MultiGraphAlignment(8, official=True).config == OFFICIAL
    m = ek.MultiGraphAlignment(8, k=3, noise_scale=0.5)
    assert m.config == DEFAULTS.replace(k=3, noise_scale=0.5)
    # the training driver: no --align-option gives the defaults, and --align-k's default is the config's
    from exgramed_train.contrastive import build_aux_loss, parse_aux_options
    from exgramed_train.model import ModelSpec

    assert build_aux_loss("alignment", 8, options=parse_aux_options("alignment", [])).config == DEFAULTS
    assert ModelSpec(llm="x", vision="y").align_k == DEFAULTS.k


def test_configuration_checks_name_the_option():
    with pytest.raises(TypeError, match=r"unknown alignment option\(s\) \['noise'\]; valid: \['k'"):
        DEFAULTS.replace(noise=0.5)
    with pytest.raises(TypeError, match="unknown alignment option"):
        ek.MultiGraphAlignment(8, noise=0.5)
    for change, match in ((dict(k=0), "option k must be an int >= 1"), (dict(k=2.0), "option k must be a int"),
                          (dict(noise_scale=float("nan")), "option noise_scale must be a finite number"),
                          (dict(dropout=1.0), r"option dropout must be a number in \[0, 1\)"),
                          (dict(lambda_=float("inf")), "option lambda_ must be a positive finite number"),
                          (dict(restarts=0), "option restarts must be"), (dict(partial=1), "option partial must be a bool")):
        with pytest.raises(ValueError, match=match):
            AlignConfig(**change)
    assert parse_option("noise_scale", "0.5") == 0.5 and parse_option("partial", "true") is True
    with pytest.raises(ValueError, match="option max_iter must be a int, got 'many'"):
        parse_option("max_iter", "many")


def _documented_align_options():
    """Every ``--align-option KEY=VALUE`` written in the repository's Markdown files."""
    found = []
    for md in list(ROOT.glob("*.md")) + list(ROOT.glob("docs/*.md")) + list(ROOT.glob("exgramed_train/*.md")):
        for m in re.finditer(r"--align-option[ =]([A-Za-z_]+=[^\s`'\"]+)", md.read_text()):
            found.append((md.name, m.group(1)))
    return found


def test_documented_align_options_parse():
    from exgramed_train.contrastive import build_aux_loss, parse_aux_options

    examples = _documented_align_options()
    assert examples  # the docs show some
    for where, pair in examples:
        opts = parse_aux_options("alignment", [pair])
        build_aux_loss("alignment", 8, options=opts)  # the module accepts them too
    with pytest.raises(ValueError, match="unknown key 'noise' for --aux-loss alignment; valid: metric"):
        parse_aux_options("alignment", ["noise=0.5"])


def test_readme_python_examples_run():
    """The README's Python code blocks run as written."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
