"""The shape of the code, checked: layered packages, imports at the top, no cycles, short functions, a torch-free
parser. docs/ARCHITECTURE.md describes the layers these tests enforce."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Each package may import only from packages of a lower layer (and from itself).
LAYERS = dict(
    core=0, cache=1, model=2, data=2, config=3, tune=4, train=5, sample=5, bench=6, eval=6, upcycle=6, paper=7, cli=8
)
SCRIPTS = ["main.py", "run_paper_manifest.py", "prepare_fineweb.py", "generate_paper_figures.py"]
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """production module name -> file."""
    out = {}
    for path in sorted((REPO / "production").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def production_imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("production"):
            found += [(f"{node.module}.{a.name}", node) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.startswith("production")]
    return found


def package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def resolve_module(name: str, known: dict) -> str:
    """`production.cache.policy.parse_policy` -> `production.cache.policy` (the longest known module prefix)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_package_has_a_layer():
    packages = {package(m) for m in modules()} - {None}
    assert packages == set(LAYERS), packages ^ set(LAYERS)


def test_imports_point_down_the_layers():
    known = modules()
    upward = []
    for name, path in known.items():
        src = package(name)
        for target, _ in production_imports(ast.parse(path.read_text())):
            dst = package(resolve_module(target, known))
            if src and dst and dst != src and LAYERS[dst] >= LAYERS[src]:
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_no_import_cycle_between_modules():
    known = modules()
    graph = {
        name: {resolve_module(t, known) for t, _ in production_imports(ast.parse(path.read_text()))} & set(known)
        for name, path in known.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node] - {node}:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def python_files() -> list[Path]:
    return [*modules().values(), *(REPO / s for s in SCRIPTS)]


def test_imports_sit_at_the_top_of_every_file():
    nested = []
    for path in python_files():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                nested += [
                    f"{path.name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)
                ]
    assert not nested, nested


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in [*python_files(), *sorted((REPO / "tests").glob("*.py"))]:
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                n = fn.end_lineno - fn.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name} ({n} lines)")
    assert not long, long


def test_no_file_points_to_notes_users_do_not_have():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    marker = "DESIGN" + ".md"
    hits = [f for f in tracked if (REPO / f).is_file() and marker in (REPO / f).read_text(errors="ignore")]
    assert not hits, hits


def test_the_cli_parses_without_torch():
    """`main.py --help` and usage mistakes must not wait for torch to import."""
    code = "import sys, production.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_input_mistakes_are_reported_before_torch_is_imported(tmp_path):
    """Presets, overrides, paths and file formats are checked torch-free (production.cli.checks)."""
    text = tmp_path / "notes.npy"
    text.write_text("not tokens")
    cases = [
        ["--mode", "train", "--size", "gigantic"],
        ["--mode", "train", "--n-head", "5"],
        ["--mode", "train", "--data", str(tmp_path / "missing.npy")],
        ["--mode", "train", "--data", str(text)],
        ["--mode", "train", "--device", "tpu"],
        ["--mode", "sample", "--ckpt", str(tmp_path), "--prompt", "a"],
        ["--mode", "sample", "--ckpt", str(tmp_path / "none.pt"), "--prompt", "a"],
    ]
    code = (
        "import sys, contextlib, io; from production.cli.main import main\n"
        f"for argv in {cases!r}:\n"
        "    with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "        assert main(argv) == 2 and err.getvalue().startswith('error: '), (argv, err.getvalue())\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
