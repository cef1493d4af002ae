"""The package's shape, checked: imports point down the floors only, no module reaches a sibling's
underscore names, and no function has more than 60 lines of code."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qwen3_mlx"

# Top to bottom, as the README's file table lists them: a module imports modules of lower floors only.
FLOORS = [
    ["__main__", "__init__", "server.__init__"],  # entry points and the package's facades
    ["cli"],
    ["batch_files"],
    ["server.serve"],
    ["server.app"],
    ["server.guard"],
    ["server.anthropic", "server.responses"],
    ["server.params", "server.replies"],
    ["server.protocol"],
    ["distributed"],
    ["engine"],
    ["batch", "chat"],
    ["generation"],
    ["speculative"],
    ["request", "prefill"],
    ["response", "prompt_cache", "structured", "memory"],
    ["converter"],
    ["prompt", "loader"],
    ["sampling", "tools", "tokenizer", "options"],
    ["parallel"],
    ["fast"],
    ["model", "batch_cache"],
    ["cache", "config"],
    ["kv_quant"],
    ["device", "errors", "files"],
]


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def imports(name: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every relative import in the module, at any depth."""
    package = name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module is None:
                out += [(".".join(base + [alias.name]), []) for alias in node.names]
            else:
                out.append((".".join(base + [node.module]), [alias.name for alias in node.names]))
    return out


def test_every_module_has_a_floor():
    placed = [name for floor in FLOORS for name in floor]
    assert sorted(placed) == sorted(modules()), "place the new module on a floor of FLOORS"


def test_imports_point_down_only():
    floor = {name: i for i, names in enumerate(FLOORS) for name in names}
    upward = [f"{name} imports {target}" for name, tree in modules().items() for target, _ in imports(name, tree)
              if target in floor and floor[target] <= floor[name] and not name.endswith("__init__")]
    assert upward == []


def test_no_module_imports_a_siblings_underscore_names():
    private = [f"{name}: {target}.{n}" for name, tree in modules().items() for target, names in imports(name, tree)
               for n in names if n.startswith("_")]
    assert private == []


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    lines = {i for stmt in body for i in range(stmt.lineno, stmt.end_lineno + 1)}
    return sum(1 for i in lines if source[i - 1].strip() and not source[i - 1].strip().startswith("#"))


def test_no_function_has_more_than_60_lines_of_code():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node, source) > 60:
                long.append(f"{path.name}:{node.lineno} {node.name}: {code_lines(node, source)} lines")
    assert long == []
