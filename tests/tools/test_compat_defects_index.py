"""docs/compat-defects.md maps every COMPAT §15 defect to the tests that prove it; this keeps the map honest:
all 52 numbers appear once, each names at least one test, and every node id names a real test function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "compat-defects.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*)\|(.*)\|\s*$")


def rows() -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for line in TABLE.read_text().splitlines():
        if match := ROW.match(line):
            number = int(match.group(1))
            assert number not in found, f"defect {number} is listed twice"
            found[number] = [i for i in re.findall(r"`([^`]+)`", match.group(3)) if "::" in i]
    return found


def defined_tests(path: Path) -> set[str]:
    """'name' for module-level tests and 'Class::name' for methods of Test classes."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test")
            )
    return names


def test_every_defect_is_listed_with_at_least_one_test() -> None:
    table = rows()
    assert sorted(table) == list(range(1, 53))
    assert [n for n, ids in table.items() if not ids] == []


def test_every_node_id_names_a_real_test() -> None:
    cache: dict[str, set[str]] = {}
    missing = []
    for number, ids in rows().items():
        for node_id in ids:
            file, _, name = node_id.partition("::")
            path = REPO / file
            assert file.startswith("tests/") and file.endswith(".py"), node_id
            if file not in cache:
                cache[file] = defined_tests(path) if path.is_file() else set()
            if name.split("[")[0] not in cache[file]:
                missing.append(f"{number}: {node_id}")
    assert missing == []


def test_the_checker_notices_a_stale_id(tmp_path: Path) -> None:
    fake = tmp_path / "test_x.py"
    fake.write_text("def test_a():\n    pass\n\nclass TestB:\n    async def test_c(self):\n        pass\n")
    assert defined_tests(fake) == {"test_a", "TestB::test_c"}
