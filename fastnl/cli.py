"""The ``fastnl`` command: one subcommand per module in :mod:`fastnl.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User-facing failures are raised as :class:`fastnl.errors.UserError` and printed as one line;
``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fastnl import __version__
from fastnl.errors import UserError

# Order is the order shown by `fastnl --help`.
COMMANDS = (
    "fastnl.commands.demo",
    "fastnl.commands.train",
    "fastnl.commands.eval",
    "fastnl.commands.extract",
    "fastnl.commands.search",
    "fastnl.commands.synth",
    "fastnl.commands.bench",
    "fastnl.commands.check",
)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default or
    there is nothing to show (no default, or a plain on/off flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or isinstance(action, argparse._StoreTrueAction)):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnl",
        description="Video person re-identification with non-local spatial and temporal attention "
        "(SE-ResNet50 + NLAM + NLTP, Liu et al. 2020) on fused Triton and C++/CUDA kernels.",
    )
    parser.add_argument("--version", action="version", version=f"fastnl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                           formatter_class=_HelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        if getattr(args, "debug", False):
            raise
        print(f"fastnl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
