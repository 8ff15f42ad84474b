"""The ``itq3s`` command line: one sub-command per module of ``_src/commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors that a user can fix are raised as
:class:`CommandError` and printed as one line (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from itq3s_jax._src import commands as _commands
from itq3s_jax._src import config


class CommandError(Exception):
  """A user-facing error: printed as ``itq3s: error: <message>``, exit status 2."""


def add_rounding_argument(p: argparse.ArgumentParser, when: str) -> None:
  """The ``--rounding`` option of the commands that GPTQ-round (one definition, one help)."""
  p.add_argument("--rounding", choices=config.GPTQ_ROUNDINGS,
                 help=f"GPTQ rounding {when} (default: two_neighbour where the format has a "
                 "certified bound, else unrestricted)")


def _command_modules():
  for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda i: i.name):
    if not info.name.startswith("_"):
      yield importlib.import_module(f"{_commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="itq3s", description="ITQ3_S 3-bit weight formats for JAX.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for mod in _command_modules():
    p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)
  return parser


def _quiet_closed_loop(previous):
  """An unraisable hook that drops asyncio's "Event loop is closed" from finalizers.

  When orbax fails on a damaged checkpoint while other reads are pending, their
  completion callbacks later run into orbax's closed event loop; Python prints that
  as an unraisable exception after our one-line error. Nothing reaches our code and
  the exit status is already set, so that one message is not shown; every other
  unraisable exception goes to the previous hook.
  """
  if getattr(previous, "_itq3s_quiet", False):  # main() called again in this process
    return previous

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook._itq3s_quiet = True
  return hook


def main(argv: list[str] | None = None) -> int:
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
  try:
    parser = build_parser()
  except KeyboardInterrupt:  # Ctrl-C while the command modules (jax, orbax) import
    print("itq3s: interrupted", file=sys.stderr)
    return 130
  args = parser.parse_args(argv)
  if not hasattr(args, "_run"):
    parser.print_help()
    return 2
  try:
    return int(args._run(args) or 0)
  except CommandError as exc:
    print(f"itq3s {args.command}: error: {exc}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"itq3s {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
