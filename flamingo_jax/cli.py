"""What the commands share: argparse errors as one line, and `run_command`, which turns a
user error into one line on stderr and exit status 2 (a library traceback is for bugs)."""
import argparse
import logging
import sys

EPILOG = "exit status: 0 ok, 2 a user error (one line on stderr)"


class UsageError(ValueError):
  """A bad command line (argparse's check or ours); the message names the flag."""


class Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not argparse's usage block
    raise UsageError(message)


def run_command(name: str, parse, work, argv=None, user_errors=(ValueError, OSError)) -> int:
  """`work(parse(argv))`; 0, or 2 with `name: error: …` on stderr for a UsageError or
  one of `user_errors` (our errors name the flag, file or field)."""
  try:
    args = parse(argv)
  except UsageError as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # --help
    return int(e.code or 0)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
  try:
    work(args)
  except (UsageError,) + tuple(user_errors) as e:
    print(f"{name}: error: {'; '.join(str(e).splitlines())}", file=sys.stderr)
    return 2
  return 0
