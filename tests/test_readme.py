"""README.md stays true to the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

from tokenchat.server.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    for variable, default in Settings.describe():
        row = re.search(rf"^\| `{variable}` \| ([^|]+) \|", readme, re.MULTILINE)
        assert row, f"{variable} is missing from README.md"
        shown = row.group(1).strip().strip("`")
        if default != "''":
            assert shown == default.strip("'"), f"{variable}: README says {shown}, code {default}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, re.DOTALL)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_test_command_runs_the_javascript_client_tests() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, re.DOTALL)
    test_command = next(c for c in commands if "pytest" in c)
    # The shell expands the pattern, so Node 20 and 22+ get the same files (a
    # directory argument is searched by Node 20 only: 21+ takes it for a file).
    assert "node --test client_demo/js/tests/*.test.js" in test_command
    # An unmatched pattern would reach node as is and fail, but say so here.
    assert list((ROOT / "client_demo" / "js" / "tests").glob("*.test.js"))


def test_links_to_docs_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs|client_demo|loadtests)/[^)#]+)\)", readme):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_procfile_commands_exist() -> None:
    from tokenchat.server.cli import main

    for line in (ROOT / "Procfile").read_text().splitlines():
        command = line.split(":", 1)[1].split("tokenchat", 1)[1].split()[0]
        try:
            main([command, "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, f"tokenchat {command} is not a command"
