"""The layout rules of docs/architecture.md, checked on the real files.

Import directions are import-linter's (the contracts in pyproject.toml, run here as `make test` runs them); the
rest is read with ``ast``: module and function sizes, what the root of ``core/`` holds, the subpackages'
docstrings, and that plugin code (built-in, the example, the scaffold's template, the guide's code) imports
tuneforge only through ``tuneforge.sdk``.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE, PLUGINS = ROOT / "core", ROOT / "plugins"
# Each example package's source folder (a third-party plugin as its own pip package) and its import package.
EXAMPLES = {ROOT / "examples" / "tuneforge-ia3" / "src": "tuneforge_ia3",
            ROOT / "examples" / "tuneforge-prefix" / "src": "tuneforge_prefix"}
GUIDE = ROOT / "docs" / "writing-mechanisms.md"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# argparse declarations: one add_argument per option, long by nature and read as a table
LONG_FUNCTIONS_ALLOWED = {("core/tools/cli.py", "build_parser")}
ROOT_FILES = {"__init__.py", "__main__.py", "hookspecs.py", "errors.py"}


def _python_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _subpackages() -> list[Path]:
    return sorted(p for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__")


def _lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    if find_spec("importlinter") is None:
        pytest.fail("the import contracts need import-linter: pip install -e '.[test]' (or pip install import-linter)")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_import_contracts_hold():
    # The example's package is a root of the contracts; find it whether or not it is installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*map(str, EXAMPLES), os.environ.get("PYTHONPATH")])))
    done = _lint_imports(ROOT, env)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "0 broken" in done.stdout, done.stdout[-3000:]


def test_import_contracts_catch_a_violation_of_each(tmp_path):
    """A copy of the packages with one violation per contract: every contract must break."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(CORE, tmp_path / "tuneforge", ignore=skip)
    shutil.copytree(PLUGINS, tmp_path / "plugins", ignore=skip)
    for src, package in EXAMPLES.items():
        shutil.copytree(src / package, tmp_path / package, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # Each breaks one contract: an upward import (nothing below tools imports it, so no cycle), a plugin that
    # goes around the SDK, an import of the package root, and a cycle inside one package.
    (tmp_path / "tuneforge" / "sdk" / "upward.py").write_text("import tuneforge.tools.hf_tiny\n")
    (tmp_path / "plugins" / "around.py").write_text("from tuneforge.engine import loop\n")
    (tmp_path / "tuneforge" / "tools" / "rooted.py").write_text("import tuneforge\n")
    (tmp_path / "tuneforge" / "engine" / "cycle_a.py").write_text("from tuneforge.engine import cycle_b\n")
    (tmp_path / "tuneforge" / "engine" / "cycle_b.py").write_text("from tuneforge.engine import cycle_a\n")
    # lint-imports puts its working folder first on sys.path, so the copies shadow the installed packages.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _lint_imports(tmp_path, env)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "Contracts: 0 kept, 4 broken." in done.stdout, done.stdout[-6000:] + done.stderr[-2000:]
    for offender in ("tuneforge.sdk.upward", "plugins.around", "tuneforge.tools.rooted", ".cycle_a"):
        assert offender in done.stdout, offender


def test_every_subpackage_is_a_layer_and_a_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    layered = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    packaged = set(config["tool"]["setuptools"]["packages"])
    for folder in _subpackages():
        name = f"tuneforge.{folder.name}"
        assert name in layered, f"core/{folder.name}/ is in no layer of the import contract in pyproject.toml"
        assert name in packaged, f"core/{folder.name}/ is missing from [tool.setuptools] packages: not installed"


def test_core_root_holds_only_the_package_faces():
    strays = [p.name for p in CORE.iterdir()
              if p.is_file() and p.name not in ROOT_FILES and not re.fullmatch(r"_C\..*\.so", p.name)]
    assert not strays, f"core/ holds only {sorted(ROOT_FILES)}, _C*.so and subpackages; move {strays} into one"


@pytest.mark.parametrize("folder", [*_subpackages(), *sorted(p for p in PLUGINS.iterdir() if p.is_dir()
                                                              and p.name != "__pycache__")], ids=_rel)
def test_each_package_says_what_it_is_for_and_may_import(folder):
    init = folder / "__init__.py"
    assert init.is_file(), f"{_rel(folder)} has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert len(doc.splitlines()) >= 2, f"{_rel(init)}: say in its docstring what the package is for"
    assert "import" in doc.lower(), f"{_rel(init)}: say in its docstring what it may import (its layer)"


@pytest.mark.parametrize("path", _python_files(CORE, PLUGINS, *EXAMPLES), ids=_rel)
def test_module_is_at_most_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_rel(path)} has {lines} lines (at most {MAX_MODULE_LINES}): split it"


def test_functions_are_at_most_80_lines():
    long = []
    for path in _python_files(CORE, PLUGINS, *EXAMPLES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (_rel(path), node.name) not in LONG_FUNCTIONS_ALLOWED:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name}() has {lines} lines")
    assert not long, f"functions of more than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _tuneforge_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of tuneforge or a module of it."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tuneforge"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "tuneforge":
            found.append((node.lineno, node.module))
    return found


def _outside_sdk(source: str, where: str, allowed=("tuneforge.sdk",)) -> list[str]:
    return [f"{where}:{line} imports {module}" for line, module in _tuneforge_imports(ast.parse(source))
            if module not in allowed]


def test_plugins_import_tuneforge_only_through_the_sdk():
    bad = [b for p in _python_files(PLUGINS, *EXAMPLES) for b in _outside_sdk(p.read_text(), _rel(p))]
    assert not bad, "plugins import from tuneforge.sdk only (add what is missing there):\n" + "\n".join(bad)


def test_the_examples_tests_use_the_user_face_and_the_sdk_only():
    # A plugin package's own tests drive runs as a user does (tuneforge.train) and build models and data with the
    # SDK's testing helpers; nothing internal.
    allowed = ("tuneforge", "tuneforge.sdk", "tuneforge.sdk.testing")
    for src in EXAMPLES:
        tests = src.parent / "tests"
        bad = [b for p in _python_files(tests) for b in _outside_sdk(p.read_text(), _rel(p), allowed)]
        assert _python_files(tests) and not bad, "the example's tests import tuneforge internals:\n" + "\n".join(bad)


def test_core_imports_no_plugin():
    # Importing a plugin's module names its mechanism; what core needs from one comes through a hook.
    bad = [f"{_rel(p)}:{line} imports {module}" for p in _python_files(CORE)
           for line, module in _tuneforge_imports(ast.parse(p.read_text()))
           if module.startswith("tuneforge.plugins")]
    assert not bad, "core imports plugins:\n" + "\n".join(bad)


def test_the_scaffolds_package_imports_tuneforge_only_through_the_sdk(tmp_path):
    from tuneforge.tools.scaffold import new_plugin

    new_plugin("my-gain", tmp_path / "pkg")
    files = _python_files(tmp_path / "pkg")
    assert len(files) >= 3
    bad = []
    for path in files:
        tests = path.parent.name == "tests"  # the package's tests may use the testing helpers as well
        allowed = ("tuneforge.sdk", "tuneforge.sdk.testing") if tests else ("tuneforge.sdk",)
        bad += _outside_sdk(path.read_text(), path.relative_to(tmp_path).as_posix(), allowed)
    conftest = (tmp_path / "pkg" / "tests" / "conftest.py").read_text()
    assert 'pytest_plugins = ["tuneforge.sdk.testing"]' in conftest
    assert not bad, "the scaffold's template imports from tuneforge.sdk only:\n" + "\n".join(bad)


def test_the_guides_code_imports_tuneforge_only_through_the_sdk():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 3
    allowed = ("tuneforge.sdk", "tuneforge.sdk.testing")
    bad = [b for i, block in enumerate(blocks) for b in _outside_sdk(block, f"{_rel(GUIDE)} block {i + 1}", allowed)]
    assert not bad, "the guide's code imports from tuneforge.sdk only:\n" + "\n".join(bad)
