"""The wheel holds the whole package: every sub-package and the chat page's files, imported from the wheel
itself (an editable install finds modules in the source tree and would hide one the wheel lacks)."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwen3_mlx"


def test_the_wheel_holds_and_imports_every_sub_package_and_the_page(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("qwen3_mlx-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    sources = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    shipped = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site" / "qwen3_mlx").rglob("*")
               if p.is_file()}
    assert sources - shipped == set()

    packages = sorted(".".join(("qwen3_mlx", *p.parent.relative_to(PACKAGE).parts)) for p in PACKAGE.rglob("__init__.py"))
    code = ("import importlib, importlib.resources, sys\n"
            f"for name in {packages!r}:\n"
            "    module = importlib.import_module(name)\n"
            f"    assert module.__file__.startswith({str(tmp_path / 'site')!r}), module.__file__\n"
            "page = importlib.resources.files('qwen3_mlx.server') / 'web' / 'index.html'\n"
            "print(len(page.read_text()) > 0)\n")
    # -S: no site-packages' .pth files, so no editable finder; the wheel's folder, then the dependencies.
    path = f"{tmp_path / 'site'}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"})
    assert (run.returncode, run.stdout) == (0, "True\n"), run.stderr


def test_the_public_api_is_the_package_s_own_names():
    import qwen3_mlx

    assert sorted(qwen3_mlx.__all__) == sorted([
        "load", "convert", "generate", "stream_generate", "batch_generate", "Engine", "ChatSession",
        "GenerationOptions", "EngineOptions", "REASONING_EFFORTS", "Prompt", "GenerationResult", "GenerationStats",
        "ToolCall", "parse_tool_calls", "tool_call_grammar", "embed", "rerank", "perplexity", "Qwen3Error",
        "ConfigError", "OptionError", "train", "fuse", "TrainingOptions", "TrainingReport", "TrainingResult"])
    assert all(getattr(qwen3_mlx, name) is not None for name in qwen3_mlx.__all__)
    assert qwen3_mlx.REASONING_EFFORTS["none"] == 0 and qwen3_mlx.REASONING_EFFORTS["max"] is None
