"""The installed layout: one ``tokenchat`` namespace, each module under one name.

The checkout keeps its specified top level (``server/``, ``protocol/``,
``client_demo/``), and setuptools maps those folders into ``tokenchat.*``. A
module reachable under two names (``server.x`` and ``tokenchat.server.x``)
would run twice, with two copies of its state and two distinct exception
classes, so these tests fail on any such alias.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = {"tokenchat.server": "server", "tokenchat.protocol": "protocol"}
PACKAGE_FOLDERS["tokenchat.client_demo"] = "client_demo"

# Run outside the checkout, so that only what is installed can be imported.
IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import tokenchat

def walk(package):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        # A folder whose name is not an identifier (the namespace's own folder)
        # cannot be named in an import statement, so it is not a second name.
        if info.name.isidentifier() and info.name != "__main__":
            name = f"{package}.{info.name}"
            importlib.import_module(name)
            if info.ispkg:
                walk(name)

# The editable install maps each sub-package to its folder, so walk from them.
for package in ("tokenchat.protocol", "tokenchat.server", "tokenchat.client_demo"):
    walk(package)
generic = [n for n in ("server", "protocol", "client_demo", "loadtests") if n in sys.modules]
try:
    import server
except ModuleNotFoundError:
    server_importable = False
else:
    server_importable = True
files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
print(json.dumps({"generic": generic, "server_importable": server_importable, "files": files}))
"""


def _ours(files: dict[str, str | None]) -> dict[str, str | None]:
    """The modules loaded from the checkout (the venv inside it excluded)."""
    venv = str(ROOT / ".venv")
    return {n: f for n, f in files.items() if f and f.startswith(str(ROOT)) and venv not in f}


def _aliases(files: dict[str, str | None]) -> dict[str, list[str]]:
    names_of: dict[str, list[str]] = defaultdict(list)
    for name, file in files.items():
        if file is not None:
            names_of[str(Path(file).resolve())].append(name)
    return {file: names for file, names in names_of.items() if len(names) > 1}


def test_everything_installed_imports_under_one_name_only(tmp_path: Path) -> None:
    import json

    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["generic"] == []
    assert not report["server_importable"], "a generic `server` package is installed"
    ours = _ours(report["files"])
    assert "tokenchat.server.cli" in ours
    assert "tokenchat.server.namespace-package" not in ours
    assert _aliases(ours) == {}


def test_no_module_of_this_test_run_was_imported_twice() -> None:
    # pytest puts the checkout on sys.path, so a stray `import server.x` in a
    # test would load a second copy: catch it here, whatever ran before.
    import tokenchat.server.cli  # noqa: F401

    files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
    ours = _ours(files)
    assert _aliases(ours) == {}
    assert not any(name.split(".")[0] in ("server", "protocol", "client_demo") for name in ours)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"tokenchat"}
    for package, folder in PACKAGE_FOLDERS.items():
        assert setuptools["package-dir"][package] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if all(part.isidentifier() for part in parts):
                on_disk.add(".".join((package, *parts)))
    assert set(setuptools["packages"]) == on_disk


def test_python_dash_m_tokenchat_is_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenchat", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tokenchat")


def _modules_after(code: str, tmp_path: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.split()


def test_the_server_never_imports_the_client(tmp_path: Path) -> None:
    # Every server module, the HTTP API (which serves the demo page) and the
    # CLI (whose `chat` the client registers) included.
    loaded = _modules_after(
        "import importlib, pkgutil, tokenchat.server as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'tokenchat.server.'):\n"
        "    if m.name.replace('.', '').isidentifier(): importlib.import_module(m.name)\n"
        "from tokenchat.server.http.api import STATIC_DIR\n"
        "assert (STATIC_DIR / 'index.html').is_file()",
        tmp_path,
    )
    assert "tokenchat.server.cli" in loaded and "tokenchat.server.http.api" in loaded
    assert [m for m in loaded if m.startswith("tokenchat.client_demo")] == []


def test_the_ledger_runs_without_a_gateway(tmp_path: Path) -> None:
    loaded = _modules_after(
        "import tokenchat.server.cli, tokenchat.server.ledger.standalone", tmp_path
    )
    assert "tokenchat.server.ledger.writer" in loaded
    assert [m for m in loaded if m.startswith("tokenchat.server.gateway")] == []


# --- docs/architecture.md stays true to the code --------------------------------------

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _section(title: str) -> str:
    text = ARCHITECTURE.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _ast_of(source: str) -> str:
    """The code of ``source`` without its comments and layout."""
    return ast.dump(ast.parse(textwrap.dedent(source)))


def test_the_worked_example_quotes_the_code() -> None:
    section = _section("Adding a paid action: a worked example")
    declaration, method = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    [script] = re.findall(r"```lua\n(.*?)```", section, re.DOTALL)
    actions = (ROOT / "server" / "economy" / "actions.py").read_text()
    [unlock] = [
        node
        for node in ast.parse(actions).body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "UNLOCK"
    ]
    assert _ast_of(declaration) == ast.dump(ast.Module(body=[unlock], type_ignores=[]))
    assert script == (ROOT / "server" / "economy" / "lua" / "unlock.lua").read_text()
    economy = (ROOT / "server" / "economy" / "economy.py").read_text()
    [runner] = [node for node in ast.parse(economy).body if getattr(node, "name", "") == "Economy"]
    assert isinstance(runner, ast.ClassDef)
    [unlock_method] = [n for n in runner.body if getattr(n, "name", "") == "unlock"]
    # Shown outside its class: put back in one, so its docstring's lines match.
    [quoted] = ast.parse("class Economy:\n" + textwrap.indent(method, "    ")).body
    assert isinstance(quoted, ast.ClassDef)
    assert ast.dump(quoted.body[0]) == ast.dump(unlock_method)


def test_the_folders_table_names_every_module() -> None:
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(
            r"^\| `([\w/]+/)` \| [^|]+ \| (.+) \|$", _section("The folders"), re.M
        )
    }
    for folder in ("protocol/", "server/", "client_demo/", "loadtests/"):
        assert folder in rows, folder
        for sub in sorted((ROOT / folder).iterdir()):
            if sub.is_dir() and (sub / "__init__.py").exists() and f"{folder}{sub.name}/" in rows:
                continue  # a sub-package: its own row
            name = sub.stem if sub.suffix == ".py" else sub.name
            if not (sub.suffix == ".py" or sub.is_dir()) or name.startswith(("_", ".")):
                continue  # data files, __init__, caches
            if name == "namespace-package":
                continue  # the `tokenchat` package itself (see its docstring)
            shown = f"`{name}`" if sub.suffix == ".py" else f"`{name}/`"
            assert shown in rows[folder], f"{folder}{sub.name} is not in architecture.md's folders"
    for folder in (f for f in rows if f.startswith("server/") and f != "server/"):
        for module in (ROOT / folder).glob("*.py"):
            if module.stem != "__init__":
                assert f"`{module.stem}`" in rows[folder], f"{folder}{module.name}"


def test_the_client_never_imports_the_server(tmp_path: Path) -> None:
    # client_demo depends on the protocol only: a client install needs no server.
    loaded = _modules_after(
        "import importlib, pkgutil, tokenchat.client_demo as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'tokenchat.client_demo.'):\n"
        "    importlib.import_module(m.name)",
        tmp_path,
    )
    assert "tokenchat.client_demo.client" in loaded and "tokenchat.client_demo.cli" in loaded
    assert [m for m in loaded if m.startswith("tokenchat.server")] == []
