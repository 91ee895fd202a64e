"""gitignore-style exclude rules, matched per path component.

A pattern without a slash matches a basename at any depth; a leading or inner `/` anchors it at the
directory that declares it (the source root, or a nested `.gitignore`'s directory); a trailing `/`
matches directories only; `*`, `?`, `[...]` never cross a `/`, `**` does; `!` re-includes; the last
matching rule wins; matching is case-sensitive. An excluded directory is pruned by the scanner, so
nothing below it can be re-included (as in git).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    "__pycache__",
    "node_modules",
    "dist",
    "build",
    ".venv",
    ".mypy_cache",
    ".pytest_cache",
    "*.pyc",
)


def glob_to_regex(glob: str) -> str:
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if glob.startswith("**", i):
            at_start = i == 0 or glob[i - 1] == "/"
            if at_start and glob.startswith("**/", i):
                out.append("(?:.*/)?")  # zero or more whole directories
                i += 3
                continue
            out.append(".*")
            i += 2
            continue
        if c == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            end = glob.find("]", j)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : end]
                negated = body[:1] in ("!", "^")
                body = body[1:] if negated else body
                escaped = body.replace("\\", "\\\\").replace("[", "\\[")
                out.append("[" + ("^/" if negated else "") + escaped + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


_NOTHING = re.compile(r"(?!)")  # matches nothing: no rule can exclude a file


@dataclass(frozen=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool
    base: str  # "" or "sub/dir/": the directory whose .gitignore declared the rule

    def matches(self, rel: str, name: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if self.base:
            if not rel.startswith(self.base):
                return False
            rel = rel[len(self.base) :]
        return self.regex.fullmatch(rel if self.anchored else name) is not None


def compile_rule(pattern: str, base: str = "") -> Rule | None:
    text = pattern.rstrip("\n\r")
    if not text.strip() or text.startswith("#"):
        return None
    if not text.endswith("\\ "):
        text = text.rstrip(" ")
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    elif text.startswith("\\!") or text.startswith("\\#"):
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    anchored = "/" in text
    text = text.lstrip("/")
    if not text:
        return None
    return Rule(pattern, re.compile(glob_to_regex(text), re.DOTALL), negate, dir_only, anchored, base)


class Excludes:
    """An ordered rule list; `child(dir, lines)` adds a nested `.gitignore`'s rules for a subtree."""

    def __init__(self, patterns: Iterable[str] | None = None, *, defaults: bool = True) -> None:
        sources = [*(DEFAULT_EXCLUDES if defaults else ()), *(patterns or ())]
        self._set(tuple(r for r in map(compile_rule, sources) if r is not None))

    def _set(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        # Most paths match no rule at all: one combined regex per kind answers that in a single call.
        self._screens: dict[bool, tuple[re.Pattern[str] | None, re.Pattern[str] | None]] = {}
        for is_dir in (False, True):
            usable = [r for r in rules if not r.base and (is_dir or not r.dir_only)]
            names = [r.regex.pattern for r in usable if not r.anchored]
            paths = [r.regex.pattern for r in usable if r.anchored]
            self._screens[is_dir] = (
                re.compile("|".join(f"(?:{p})" for p in names), re.DOTALL) if names else None,
                re.compile("|".join(f"(?:{p})" for p in paths), re.DOTALL) if paths else None,
            )
        self._scoped = any(r.base for r in rules)

    @classmethod
    def _of(cls, rules: tuple[Rule, ...]) -> Excludes:
        made = cls.__new__(cls)
        made._set(rules)
        return made

    def child(self, rel_dir: str, lines: Iterable[str]) -> Excludes:
        base = rel_dir.strip("/") + "/" if rel_dir.strip("/") else ""
        extra = tuple(r for r in (compile_rule(line, base) for line in lines) if r is not None)
        return self._of(self.rules + extra) if extra else self

    def file_screen(self) -> re.Pattern[str] | None:
        """For a scanner's per-file loop: when this returns a pattern, a file whose basename it does not
        fullmatch is not excluded (one regex call instead of `excluded`); None means ask `excluded`."""
        if self._scoped:
            return None
        by_name, by_path = self._screens[False]
        if by_path is not None:
            return None
        return by_name if by_name is not None else _NOTHING

    def excluded(self, rel: str, is_dir: bool) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if not self._scoped:
            by_name, by_path = self._screens[is_dir]
            if (by_name is None or by_name.fullmatch(name) is None) and (
                by_path is None or by_path.fullmatch(rel) is None
            ):
                return False
        verdict = False
        for rule in self.rules:
            if rule.negate == verdict and rule.matches(rel, name, is_dir):
                verdict = not rule.negate
        return verdict
