"""The module graph of the program, read with ``ast``: layers hold and argv stays in the CLI.

models/ (the engine) imports none of the others; experiments/ uses models/ only; app/ and
worker/ sit on top; nothing outside app/cli/ imports the CLI or parses argv; no import cycle.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "worker", "models", "experiments")
ARGV_CALLS = ("parse_args", "parse_known_args", "Namespace")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _in_cli(module: str) -> bool:
    return module == "app.cli" or module.startswith("app.cli.")


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the program's modules it imports; and the argv calls outside app/cli/."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def owner(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in files:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, set[str]] = {m: set() for m in files}
    argv: list[str] = []
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Call) and not _in_cli(module):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ARGV_CALLS:
                    argv.append(f"{path.relative_to(ROOT)}:{node.lineno} {called}")
            for name in names:
                target = owner(name)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph, argv


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _edges(graph: dict[str, set[str]], source: str, targets: tuple[str, ...]) -> list[str]:
    top = lambda m: m.split(".")[0]  # noqa: E731
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if top(m) == source and top(d) in targets)


def test_every_package_is_there() -> None:
    assert all((ROOT / pkg / "__init__.py").is_file() for pkg in PACKAGES)
    assert (ROOT / "app" / "cli" / "__init__.py").is_file()


def test_no_import_cycle() -> None:
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_models_imports_only_models() -> None:
    graph, _ = _graph()
    assert _edges(graph, "models", ("app", "worker", "experiments")) == []


def test_experiments_import_neither_app_nor_worker() -> None:
    graph, _ = _graph()
    assert _edges(graph, "experiments", ("app", "worker")) == []


def test_only_the_cli_imports_the_cli() -> None:
    graph, _ = _graph()
    assert sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if _in_cli(d) and not _in_cli(m)) == []


def test_only_the_cli_parses_argv() -> None:
    _, argv = _graph()
    assert argv == []


def test_the_checks_can_fail() -> None:
    """The helpers see a cycle and a layer break when there is one (they are not vacuous)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _edges({"models.x": {"app.y"}, "app.y": set()}, "models", ("app",)) == ["models.x -> app.y"]


def test_the_api_and_the_service_commands_start_without_torch() -> None:
    """The API process, the `attrib` parser and the modules of `serve`, `worker`'s parent,
    `migrate`, `key` and `owner` import no engine: torch loads only in what computes (workers,
    `train`, `attribute`, `validate`, `import`, `register`, `retrain`)."""
    light = ("app.main", "app.cli", "app.cli.serve", "app.cli.operations", "experiments", "models.presets",
             "models.scores", "models.errors")
    heavy = ("torch", "scipy", "models.ensemble", "models.data")
    code = (f"import sys\nfor m in {light!r}: __import__(m)\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert loaded.stdout.strip() == "", f"loaded at start-up: {loaded.stdout.strip()}"
    # and the parser still knows every command (whose modules load when they run)
    from app.cli import build_parser
    from app.cli.parsers import Command

    parser = build_parser()
    [commands] = [action for action in parser._actions if action.dest == "command"]
    assert {"train", "generate", "attribute", "info", "validate", "migrate", "import", "owner", "key",
            "register", "opt-out", "retrain", "serve", "worker", "demo-setup"} <= set(commands.choices or ())
    for command in ("train", "serve", "migrate", "demo-setup"):
        func = parser.parse_args([command]).func
        assert isinstance(func, Command)
        assert callable(getattr(importlib.import_module(func.module), func.name))
