"""The README's promises: it opens with the two commands, CI runs the same test command, exit codes match."""

from __future__ import annotations

from pathlib import Path

from gallery.errors import exit_code_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_opens_with_exactly_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```bash" and lines[3] == "```"
    assert lines[1].startswith("./run demo") and lines[2].startswith("./run test")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run test" in ci


def test_exit_code_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- exit-codes")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- /exit-codes -->")].strip()
    assert table == exit_code_table()


def _block(readme: str, marker: str) -> str:
    start = readme.index(f"<!-- {marker}")
    return readme[readme.index("\n", start) + 1 : readme.index(f"<!-- /{marker} -->")].strip()


def test_load_option_and_fault_tables_match_the_code() -> None:
    from runtime.faults import faults_table
    from runtime.load_options import options_table

    readme = (ROOT / "README.md").read_text()
    assert _block(readme, "load-options") == options_table()
    assert _block(readme, "faults") == faults_table()
