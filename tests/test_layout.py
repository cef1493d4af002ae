"""The package's shape, checked: the sub-packages are the floors of the house and imports point down
them only (relative and absolute imports alike), no module reaches a sibling's underscore names, no
module has more than 400 lines and no function more than 60 lines of code."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qwen3_mlx"

# Sub-packages top to bottom, as README's layout lists them ("" is the ground floor: the package's own
# modules); inside each, its modules' floors top to bottom. A module imports modules on lower floors of
# its own sub-package, and any module of a lower sub-package; never upward, never sideways.
FLOORS = {
    "cli": [["commands"], ["generate_command", "chat_command", "convert_command", "serve_command",
                         "perplexity_command", "eval_command", "embed_command", "train_command"],
            ["options", "prompts_file"], ["display"]],
    "server": [["serve"], ["app"], ["guard", "relay"], ["settings", "metrics"]],
    "server.ollama": [["routes"], ["events", "catalog"], ["mapping"], ["protocol"]],
    "server.openai": [["events"], ["mapping"], ["protocol"]],
    "server.anthropic": [["events"], ["mapping"], ["protocol"]],
    "server.responses": [["events"], ["mapping"], ["protocol", "store"]],
    "server.retrieval": [["routes"], ["mapping"], ["protocol"]],
    "server.submission": [["outcome", "reading"], ["parameters", "refusal", "sealed"]],
    "distributed": [["batch"], ["engine"], ["ranks"], ["launch", "wire"]],
    "quantize": [["calibrated"], ["awq", "dwq", "gptq", "mixed"], ["calibration", "capture", "rounding"]],
    "training": [["fuse", "loop"], ["optimizers", "batches"], ["data", "options"]],
    "evaluation": [["harness"], ["perplexity"], ["documents"]],
    "generation": [["engine", "batch", "chat", "batch_check"], ["scheduler", "single"], ["batch_decode"],
                   ["verification"], ["proposers"], ["job", "prefill", "prefix_store"], ["passes"], ["picker"],
                   ["response", "prompt_cache", "memory", "sampling"], ["caches", "stops", "options"]],
    "embedding": [["embed", "rerank"], ["padded"]],
    "checkpoint": [["converter"], ["loader"], ["adapters", "foreign", "sampling_defaults"]],
    "text": [["prompt", "tool_grammar"], ["structured"], ["tokenizer"], ["template", "tools"]],
    "model": [["parallel", "fast"], ["compiled"], ["model", "batch_cache"], ["cache", "config"], ["kv_quant", "lora"]],
    "": [["collectives"], ["device", "errors", "files"]],
}
FACADES = {"__init__", "__main__"}  # a package's front door re-exports what lies below it


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def imports(name: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of the package's own modules, relative or absolute, at any depth.
    `from . import x` and `from qwen3_mlx.a import b` name a module when it is one."""
    known = set(modules_cache())
    package = name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name.removeprefix("qwen3_mlx."), []) for alias in node.names
                    if alias.name.startswith("qwen3_mlx.")]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qwen3_mlx")):
            if node.level:
                base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
            else:
                base = node.module.split(".")[1:]
            target = ".".join(base)
            for alias in node.names:
                sub = ".".join(base + [alias.name])
                if sub in known:
                    out.append((sub, []))
                else:
                    out.append((target or "__init__", [alias.name]))
    return out


_MODULES: dict[str, ast.Module] = {}


def modules_cache() -> dict[str, ast.Module]:
    if not _MODULES:
        _MODULES.update(modules())
    return _MODULES


def place(name: str) -> tuple[int, int] | None:
    """(sub-package's floor, module's floor within it), lower numbers higher up."""
    package, _, leaf = name.rpartition(".")
    order = list(FLOORS)
    if package not in FLOORS:
        return None
    for i, floor in enumerate(FLOORS[package]):
        if leaf in floor:
            return order.index(package), i
    return None


def test_every_module_has_a_floor():
    unplaced = [name for name in modules_cache() if name.rpartition(".")[2] not in FACADES and place(name) is None]
    assert unplaced == [], "place each module on a floor of FLOORS"


def test_imports_point_down_only():
    wrong = []
    for name, tree in modules_cache().items():
        if name.rpartition(".")[2] in FACADES:
            continue
        here = place(name)
        for target, _ in imports(name, tree):
            there = place(target) if target in modules_cache() else None
            if target.rpartition(".")[2] in FACADES or there is None:
                there = (list(FLOORS).index(target.removesuffix(".__init__")) if target.removesuffix(".__init__")
                         in FLOORS else -1, -1)
                if there[0] > here[0]:
                    continue  # a lower sub-package's front door
                wrong.append(f"{name} imports {target}")
            elif not (there[0] > here[0] or (there[0] == here[0] and there[1] > here[1])):
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_the_checks_see_absolute_imports_too():
    tree = ast.parse("from qwen3_mlx.errors import OptionError\nimport qwen3_mlx.model.cache\n"
                     "from qwen3_mlx.generation import engine\n")
    assert imports("text.tokenizer", tree) == [("errors", ["OptionError"]), ("model.cache", []),
                                               ("generation.engine", [])]


def test_no_module_imports_a_siblings_underscore_names():
    private = [f"{name}: {target}.{n}" for name, tree in modules_cache().items() for target, names in imports(name, tree)
               for n in names if n.startswith("_")]
    assert private == []


def test_no_module_has_more_than_400_lines():
    long = [f"{path.relative_to(PACKAGE)}: {n} lines" for path in sorted(PACKAGE.rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400]
    assert long == []


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
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {code_lines(node, source)} lines")
    assert long == []
