"""gitignore-like exclude patterns for rsync (COMPAT §12): per path component, globs never regex,
case-sensitive, `dir/` = directories only, leading `/` anchors at the source root, `**` spans
directories, `!pattern` re-includes, the last matching pattern wins."""

from __future__ import annotations

import re
from dataclasses import dataclass

BUILTIN_EXCLUDES: tuple[str, ...] = (
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


def _glob_to_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.find("]", i + 2 if glob.startswith("[!", i) or glob.startswith("[]", i) else i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool

    def matches(self, rel: str, name: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return bool(self.regex.fullmatch(rel if self.anchored else name))


def compile_rule(pattern: str) -> Rule | None:
    text = pattern.strip()
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    anchored = "/" in text
    text = text.lstrip("/")
    if not text:
        return None
    return Rule(re.compile(_glob_to_regex(text)), negate, dir_only, anchored)


class Excludes:
    def __init__(self, patterns: list[str] | None = None, *, builtins: bool = True) -> None:
        sources = [*(BUILTIN_EXCLUDES if builtins else ()), *(patterns or [])]
        self.patterns = sources
        self.rules = [r for r in (compile_rule(p) for p in sources) if r is not None]

    def excluded(self, rel: str, is_dir: bool) -> bool:
        name = rel.rsplit("/", 1)[-1]
        verdict = False
        for rule in self.rules:
            if rule.matches(rel, name, is_dir):
                verdict = not rule.negate
        return verdict
