"""Copy the tables that bench/results/quality.md marks for the README into README.md, so the README never drifts.

    python bench/readme_tables.py           # rewrite README.md's marked blocks from quality.md
    python bench/readme_tables.py --check   # exit 1 when README.md differs from what quality.md says

A block is everything between `<!-- readme:NAME -->` and `<!-- /readme:NAME -->`; each block NAME of the README is
replaced by quality.md's block of the same name. A README block that quality.md lacks is an error, not left stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- readme:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /readme:(?P=name) -->", re.DOTALL)


def blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def render(readme: str, source: str) -> str:
    """`readme` with each marked block replaced by `source`'s block of the same name."""
    found = blocks(source)
    missing = sorted(set(blocks(readme)) - set(found))
    if missing:
        raise ValueError(f"README blocks {missing} have no block of that name in quality.md")

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        return f"<!-- readme:{name} -->\n{found[name]}<!-- /readme:{name} -->"

    return BLOCK.sub(replace, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is in sync")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--source", type=Path, default=REPO / "bench" / "results" / "quality.md")
    args = parser.parse_args(argv)
    readme = args.readme.read_text()
    updated = render(readme, args.source.read_text())
    if args.check:
        if updated != readme:
            print(f"{args.readme} is out of date: run python bench/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
