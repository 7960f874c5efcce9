"""``python -m optimzoo``: print the registry table (``--help`` for the options)."""

from __future__ import annotations

import argparse
import shutil
import sys

from . import list_optimizers
from .cli import brief_usage

MIN_WIDTH = 60


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def table(specs, width: int | None = 120) -> str:
    """The registry table, every line at most ``width`` characters (None: nothing shortened). Paper titles
    are shortened to fit; aliases are listed under the table."""
    head = ("name", "kind", "state B/param", "arXiv", "paper")
    rows = [(s.name, s.kind + (" (baseline)" if s.baseline else ""), s.state_text, s.arxiv or "-", s.paper)
            for s in specs]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    if width is not None:
        fixed = sum(widths[:-1]) + 2 * (len(head) - 1)
        widths[-1] = max(min(widths[-1], width - fixed), len(head[-1]))
    fmt = lambda r: "  ".join(_clip(c, w).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    aliased = [f"{', '.join(s.aliases)} = {s.name}" for s in specs if s.aliases]
    if aliased:
        lines += ["", "aliases: " + "; ".join(aliased)]
    if width is not None:
        lines = [_clip(line, width) for line in lines]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = brief_usage(argparse.ArgumentParser(
        prog="python -m optimzoo",
        description="List the registered optimizers: name, kind, optimizer-state bytes per parameter, paper. "
                    "Names ignore case, '-' and '_'; build one with optimzoo.create_optimizer(model, name, ...)."))
    parser.add_argument("--peers", action="store_true", help="also list torch-optimizer's catalogue "
                        "(torch_optimizer.<name>), when that package is installed")
    parser.add_argument("--wide", action="store_true", help="full paper titles, whatever the terminal width")
    parser.add_argument("--width", type=int, default=None,
                        help="fit the table to this many columns (default: the terminal's width, 120 when "
                             "not a terminal)")
    args = parser.parse_args(argv)
    width = None if args.wide else args.width or (
        shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 120)
    if width is not None:
        width = max(width, MIN_WIDTH)
    print(table(list_optimizers(peers=args.peers), width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
