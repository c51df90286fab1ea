"""`python -m umae_plugin.analysis <tool> [options]`; `<tool> --help` lists a tool's options.

Each tool is a module of this package with `get_args_parser()` and `main(args)`; the module is
imported only when its tool is asked for, so `--help` here stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import one_line_errors
from . import TOOLS


def _usage() -> str:
    width = max(map(len, TOOLS))
    lines = ["usage: python -m umae_plugin.analysis <tool> [options]   (<tool> --help for its options)", "",
             "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> object:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return None
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        print(_usage(), file=sys.stderr)
        raise SystemExit(f"error: unknown tool {tool!r}")
    module = importlib.import_module(f"{__package__}.{tool}")
    parser = argparse.ArgumentParser(f"python -m umae_plugin.analysis {tool}", parents=[module.get_args_parser()],
                                     description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(rest)

    from ..runtime import setup_logging

    setup_logging(True)
    with one_line_errors():  # a UserError or OSError: one line `error: ...` and its exit status
        return module.main(args)


def entry() -> None:
    """The `umae-analysis` command: exit status 0 after a tool's run (its result dict is not a status)."""
    main()


if __name__ == "__main__":
    entry()
