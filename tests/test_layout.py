"""The package's shape, as the README's layout section describes it: no import cycles, short functions, a job per
module, and imports that point down (the core at the bottom, `cli` on top; surfaces meet only in the core or in
`data`, and reach the engine only through its written interface)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skingpt4"
SURFACES = {"cli", "data", "evaluate", "review", "serve", "train"}  # the core: top-level modules and the rest
MAX_FUNCTION_LINES = 60  # a function's own lines (functions defined inside it count for themselves)
MAX_TOP_MODULES = 16
ENGINE_INTERFACE = {"skingpt4.engine.protocol", "skingpt4.engine.settings", "skingpt4.engine.factory"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module -> the skingpt4 modules it imports, at the top or inside a function."""
    assert PACKAGE.is_dir(), f"no package at {PACKAGE}: these checks read the source tree"
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skingpt4"):
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("skingpt4")]
            else:
                continue
            found |= {t for t in targets if t in modules and t != "skingpt4"}
        found.discard(name)
        graph[name] = {t for t in found if not name.startswith(t + ".")}  # a package's own __init__ is not an edge
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def family(module: str) -> str:
    if module == "skingpt4.__main__":  # `python -m skingpt4`: the command line
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in SURFACES else "core"


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def test_no_import_cycle():
    assert cycle(imports()) is None


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def own_lines(function: ast.AST) -> int:
    """A function's lines without those of the functions and classes defined directly inside it."""
    inner = [n for n in ast.iter_child_nodes(function) if not isinstance(n, (ast.arguments, ast.expr))]
    nested, todo = 0, list(inner)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested += node.end_lineno - node.lineno + 1
        else:
            todo.extend(ast.iter_child_nodes(node))
    return function.end_lineno - function.lineno + 1 - nested


def test_functions_are_short():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and own_lines(node) > MAX_FUNCTION_LINES:
                long[f"{module_name(path)}.{node.name}"] = own_lines(node)
    assert long == {}


def test_the_length_check_counts_a_functions_own_lines():
    source = "def outer():\n    x = 1\n\n    def inner():\n        return 2\n\n    return inner\n"
    assert own_lines(ast.parse(source).body[0]) == 5  # 7 lines, 2 of them inner's


def test_every_module_says_its_job():
    """A docstring on every module: what it is for, in its first line (one job per module)."""
    silent = [module_name(p) for p in PACKAGE.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert silent == []


def test_the_top_level_holds_few_modules_and_the_engine_is_one_folder():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    engine = {p.stem for p in (PACKAGE / "engine").glob("*.py")}
    assert {"protocol", "chat", "session", "scheduler", "sampler", "decoding", "sharing", "factory"} <= engine
    defined = {
        node.name: module_name(path)
        for path in PACKAGE.rglob("*.py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.ClassDef)
    }
    for name in ("Engine", "LanguageModel", "ChatEngine", "VllmEngine", "Scheduler", "Sampler", "ChatSession"):
        assert defined[name].startswith("skingpt4.engine."), name


def test_surfaces_reach_the_engine_only_through_its_interface():
    """`serve`, `evaluate`, `review`, `train`, `data` and `cli` import from the engine only its protocol, its
    settings and its factory: never our engine or vLLM's directly, nor a back end's engine parts."""
    wrong = []
    for module, targets in imports().items():
        if family(module) == "core":
            continue
        wrong += [
            f"{module} -> {t}" for t in targets if t.startswith("skingpt4.engine.") and t not in ENGINE_INTERFACE
        ]
    assert wrong == []


def test_back_ends_do_not_import_the_engine():
    """The back ends implement the engine's `LanguageModel` as written; the engine picks them, never the reverse."""
    wrong = [
        f"{m} -> {t}" for m, ts in imports().items() for t in ts if package(m) == "backends" and package(t) == "engine"
    ]
    assert wrong == []


def test_imports_point_down():
    """The core imports no surface; a surface imports the core, `data`, and itself; only `cli` imports all;
    serving never imports training."""
    wrong = []
    for module, targets in imports().items():
        for target in targets:
            source, dest = family(module), family(target)
            allowed = dest in ("core", "data", source) or source == "cli"
            if not allowed or (source == "core" and dest != "core"):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_readme_names_every_module():
    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("src/skingpt4/\n") :]
    block = block[: block.index("```")]
    words = set(block.replace("+", " ").replace(",", " ").replace("(", " ").split())
    listed = {w.removesuffix(".py") for w in words}
    modules = {p.stem for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    folders = {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules - listed == set() and folders - words == set()


def test_the_formatter_and_the_linter_are_satisfied():
    """The formatter wins (no `fmt: skip` anywhere): `ruff format --check` and `ruff check` pass on the tree."""
    import subprocess
    import sys

    root = PACKAGE.parents[1]
    for command in (["format", "--check"], ["check"]):
        argv = [sys.executable, "-m", "ruff", *command, "src", "tests", "bench"]
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_no_formatter_exceptions():
    root = PACKAGE.parents[1]
    marked = [p.name for d in ("src", "tests", "bench") for p in (root / d).rglob("*.py") if _skips(p)]
    assert marked == []


def _skips(path: Path) -> bool:
    return any(line.rstrip().endswith(("# fmt: skip", "# fmt: off")) for line in path.read_text().splitlines())
