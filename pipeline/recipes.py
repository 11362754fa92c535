"""The documented SQL recipes (the README's short look and docs/sql.md), read from the pages
themselves: the tests run each one against a real run's database and the store benchmark
times them, so the documented queries cannot silently break or slow down."""

import re
from pathlib import Path

from pipeline.paths import REPO_ROOT

_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)


PAGES = (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "sql.md")


def sql_recipes(pages: tuple[Path, ...] = PAGES) -> list[tuple[str, str]]:
    """(name, statement) for every statement in the pages' sql blocks. A recipe's name
    is the first line of the comment above it; statements end with `;`."""
    recipes: list[tuple[str, str]] = []
    blocks = [b for page in pages for b in _BLOCK.findall(page.read_text(encoding="utf-8"))]
    for block in blocks:
        name, comment_open, statement = "", False, []
        for line in block.splitlines():
            if line.startswith("--"):
                if not comment_open:
                    name = line.lstrip("- ").strip()
                comment_open = True
                continue
            comment_open = False
            if line.strip():
                statement.append(line)
            if line.rstrip().endswith(";"):
                recipes.append((name, "\n".join(statement).rstrip().rstrip(";")))
                statement = []
    return recipes
