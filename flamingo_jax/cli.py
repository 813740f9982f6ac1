"""What the commands share: argparse errors as one line, and `run_command`, which turns a
user error into one line on stderr and exit status 2 (a library traceback is for bugs);
`run_absl` does the same for the absl commands (train.py, train_compile.py)."""
import argparse
import logging
import re
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
    print_error(name, e)
    return 2
  except SystemExit as e:  # --help
    return int(e.code or 0)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
  try:
    work(args)
  except (UsageError,) + tuple(user_errors) as e:
    print_error(name, e)
    return 2
  return 0


def print_error(name: str, error) -> None:
  """`name: error: …` as one line on stderr."""
  print(f"{name}: error: {'; '.join(str(error).splitlines())}", file=sys.stderr)


def fail(name: str, error) -> None:
  """`print_error`, then exit status 2."""
  print_error(name, error)
  sys.exit(2)


def flag_error(e: Exception, argv) -> str:
  """absl's or ml_collections' error for a bad --config file or --config.FIELD, as one
  line that names the flag (others as they are)."""
  text = str(e)
  if "Error whilst parsing config file" in text:  # ml_collections adds get_config's traceback
    head, trace = text.split("Error whilst parsing config file", 1)
    text = head + re.sub(r"^[\w.]*(Error|Exception): ", "", trace.strip().splitlines()[-1])
  missing = re.search(r"No such file or directory: '([^']*)'", text)
  if missing and "Failed loading config file" in text:
    return f"--config: {missing.group(1)} does not exist; give a config file, e.g. configs/tiny.py"
  if isinstance(e, (AttributeError, KeyError)):  # an override of a field the config lacks
    key = re.sub(r"^\W+|\W+$", "", text)
    field = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                  and key in a.split("=")[0].split(".")), f"--config.{key}")
    return (f"{field}: the config has no field {key!r}; --print_config (train.py) lists "
            "its fields")
  return re.sub(r"^flag ", "", text)


def run_absl(name: str, main, user_errors=(ValueError, OSError)) -> None:
  """`app.run(main)` with run_command's contract: a bad --config file or --config.FIELD
  override, or one of `user_errors` from main, is one line `name: error: …` on stderr
  and exit status 2 (--traceback shows the traceback instead); Ctrl-C outside
  main's own handling is one line and exit status 130. Library INFO logging (orbax's
  notices, jax's backend probing) is off: -v 0 (absl's --verbosity) brings it back."""
  from absl import app, flags
  flags.DEFINE_bool("traceback", False, "Show the traceback of a user error instead of one line.")

  def parse(argv):
    try:
      argv = flags.FLAGS(argv)
      if flags.FLAGS["verbosity"].using_default_value:  # else app.run turns INFO on
        flags.FLAGS.verbosity = -1  # absl's WARNING
      return argv
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
      if "--traceback" in argv:
        raise
      fail(name, flag_error(e, argv))

  def run(argv):
    try:
      main(argv)
    except tuple(user_errors) as e:  # the config file loads lazily: its errors come here
      if flags.FLAGS.traceback:
        raise
      fail(name, flag_error(e, sys.argv))
    except KeyboardInterrupt:
      if flags.FLAGS.traceback:
        raise
      print(f"{name}: interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(run, flags_parser=parse)
