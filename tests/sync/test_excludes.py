"""gitignore semantics of contree.sync.excludes, per path component (COMPAT §12, §15.27-28)."""

from __future__ import annotations

import pytest

from contree.sync.excludes import DEFAULT_EXCLUDES, Excludes


@pytest.mark.parametrize(
    ("rel", "is_dir", "excluded"),
    [
        (".git", True, True),
        ("sub/.git", True, True),
        (".github", True, False),
        (".gitignore", False, False),
        ("web/app/node_modules", True, True),
        ("pkg/__pycache__", True, True),
        ("a/b/mod.pyc", False, True),
        ("notes.pyc_old", False, False),
        ("Build", True, False),  # case-sensitive
        ("src/dist", True, True),
        (".venv", True, True),
    ],
)
def test_defaults_match_basenames_at_any_depth(rel: str, is_dir: bool, excluded: bool) -> None:
    assert Excludes().excluded(rel, is_dir) is excluded


def test_defaults_can_be_turned_off() -> None:
    assert not Excludes(defaults=False).excluded("node_modules", True)
    assert Excludes(["node_modules"], defaults=False).excluded("x/node_modules", True)
    assert len(DEFAULT_EXCLUDES) == 9


def test_anchored_patterns_match_from_the_root_only() -> None:
    ex = Excludes(["/build.log", "docs/*.md", "/out/"], defaults=False)
    assert ex.excluded("build.log", False) and not ex.excluded("sub/build.log", False)
    # an inner slash anchors too; '*' never crosses a '/'
    assert ex.excluded("docs/a.md", False)
    assert not ex.excluded("docs/deep/a.md", False) and not ex.excluded("x/docs/a.md", False)
    assert ex.excluded("out", True) and not ex.excluded("out", False) and not ex.excluded("a/out", True)


def test_dir_only_globs_classes_and_double_star() -> None:
    ex = Excludes(["logs/", "a/**/z.txt", "**/tmp", "file[0-9].txt", "x?.c", "[!a]b.txt"], defaults=False)
    assert ex.excluded("deep/logs", True) and not ex.excluded("deep/logs", False)
    assert ex.excluded("a/z.txt", False) and ex.excluded("a/b/c/z.txt", False)
    assert not ex.excluded("b/a/z.txt", False)
    assert ex.excluded("tmp", True) and ex.excluded("q/r/tmp", False)
    assert ex.excluded("file7.txt", False) and not ex.excluded("fileX.txt", False)
    assert ex.excluded("x1.c", False) and not ex.excluded("x12.c", False)
    assert ex.excluded("cb.txt", False) and not ex.excluded("ab.txt", False)
    assert not Excludes(["a.c"], defaults=False).excluded("abc", False)  # '.' is literal, never regex


def test_negation_last_match_wins() -> None:
    ex = Excludes(["*.log", "!keep.log", "sub/keep.log"], defaults=False)
    assert ex.excluded("a.log", False)
    assert not ex.excluded("keep.log", False) and not ex.excluded("x/keep.log", False)
    assert ex.excluded("sub/keep.log", False)
    assert not Excludes(["!dist"]).excluded("dist", True)  # re-includes a default
    assert Excludes(["\\!bang"], defaults=False).excluded("!bang", False)  # escaped '!' is literal


def test_comments_blank_lines_and_nested_gitignore_scope() -> None:
    ex = Excludes(["# comment", "", "   "], defaults=False)
    assert ex.rules == ()
    nested = Excludes(defaults=False).child("pkg", ["/gen", "*.tmp", "!ok.tmp"])
    assert nested.excluded("pkg/gen", True) and not nested.excluded("gen", True)
    assert nested.excluded("pkg/a/b.tmp", False) and not nested.excluded("other/b.tmp", False)
    assert not nested.excluded("pkg/ok.tmp", False)


@pytest.mark.parametrize(
    "patterns", [[], ["*.log", "tmp?"], ["docs/*.md"], ["!keep.pyc"], ["build/"], ["/top.txt", "x[0-9]"]]
)
def test_file_screen_never_lets_an_excluded_file_through(patterns: list[str]) -> None:
    rules = Excludes(patterns)
    screen = rules.file_screen()
    names = ["a.py", "b.pyc", "keep.pyc", "run.log", "tmp1", "top.txt", "x7", "readme.md", "dist", "ok"]
    for rel in [*names, *(f"docs/{n}" for n in names), *(f"sub/dir/{n}" for n in names)]:
        name = rel.rsplit("/", 1)[-1]
        if screen is not None and screen.fullmatch(name) is None:
            assert not rules.excluded(rel, False), (patterns, rel)
    scoped = rules.child("sub", ["*.py"])
    assert scoped.file_screen() is None  # nested .gitignore rules: every file asks `excluded`
