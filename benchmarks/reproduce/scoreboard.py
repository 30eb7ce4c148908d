"""Rewrites the generated blocks of docs/reproductions.md from the result files, so the scoreboard never holds a number
typed in by hand: each block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` and is the ``--table``
output of one script in this folder.

  .venv/bin/python benchmarks/reproduce/scoreboard.py           # rewrite the blocks
  .venv/bin/python benchmarks/reproduce/scoreboard.py --check   # exit 1 if a block differs from the result files
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import disentanglement
import iwae_table1
import ladder_vae

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reproductions.md"
RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = {"iwae-table1": iwae_table1.markdown_table, "ladder-vae": ladder_vae.markdown_table,
          "disentanglement": disentanglement.markdown_table}


def render(page: str, results_dir: Path) -> str:
    args = SimpleNamespace(results_dir=str(results_dir))
    for name, table in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(page):
            raise SystemExit(f"{PAGE}: no block <!-- {name}:begin --> ... <!-- {name}:end -->")
        body = table(args).rstrip("\n") + "\n"
        page = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), page)
    return page


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 when the page is out of date")
    p.add_argument("--page", default=str(PAGE))
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    page = Path(args.page).read_text()
    new = render(page, Path(args.results_dir))
    if args.check:
        if new != page:
            print(f"{args.page} is out of date with {args.results_dir}: run benchmarks/reproduce/scoreboard.py")
            return 1
        print(f"{args.page} matches the result files")
        return 0
    Path(args.page).write_text(new)
    print(f"rewrote the blocks {', '.join(BLOCKS)} of {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
