"""How lmjax's command-line programs (`python -m lmjax.train`, tools/*.py) report errors.

Bad input, i.e. any of lmjax's own errors (`lmjax.errors.UserError`: ConfigError,
DataError, HFError, CheckpointError, ...), prints one line on stderr,
`error: <message>`, and exits with code 2. `--verbose` or the environment variable
LMJAX_VERBOSE=1 prints the traceback above that line. A Ctrl-C that stops a program at
once (the training loop's second one) prints one line and exits with 130. Any other
exception is a bug and keeps its full traceback (exit code 1).

    @cli.main
    def main(argv) -> int:          # argv: the arguments, sys.argv[1:] when run
      parser = argparse.ArgumentParser(...)
      cli.add_verbose_flag(parser)
      ...

    if __name__ == '__main__':
      sys.exit(main())

The decorated main takes an optional argv list and returns the exit code, so tests call
it as the command line would: main(['--config=nope.py']) == 2.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from lmjax.errors import UserError

BAD_INPUT = 2  # the exit code of bad input, as argparse uses for bad arguments
INTERRUPTED = 130  # the shell's code for a program stopped by Ctrl-C
VERBOSE_FLAG = '--verbose'
VERBOSE_ENV = 'LMJAX_VERBOSE'
VERBOSE_HELP = ('on an error, print its traceback above the one-line message (or set '
                f'{VERBOSE_ENV}=1)')


def verbose(argv: Sequence[str] = ()) -> bool:
  """True if `argv` holds --verbose (absl's --verbose=true too) or LMJAX_VERBOSE is set
  (to anything but '', '0' or 'false')."""
  if os.environ.get(VERBOSE_ENV, '').strip().lower() not in ('', '0', 'false', 'no'):
    return True
  return any(a == VERBOSE_FLAG or a.lower() in ('--verbose=true', '--verbose=1')
             for a in argv)


def add_verbose_flag(parser) -> None:
  """Adds --verbose to an argparse parser (read by `main` from the raw argv)."""
  parser.add_argument(VERBOSE_FLAG, action='store_true', help=VERBOSE_HELP)


def report(error: BaseException, show_traceback: bool = False) -> None:
  """Prints `error` as `error: <message>` on stderr, with its traceback first if asked."""
  if show_traceback or verbose():
    traceback.print_exception(error)
  print(f'error: {error}', file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
  """Exits at once with `error: <message>` and code 2 (for bad input found before a
  main function runs, e.g. while parsing flags)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(BAD_INPUT)


def run(fn: Callable, *args, show_traceback: bool = False):
  """fn(*args), with lmjax's own errors reported by `report`: fn's result, or 2; a
  KeyboardInterrupt (training's second Ctrl-C, or any Ctrl-C outside the training loop)
  one line and 130."""
  try:
    return fn(*args)
  except UserError as e:
    report(e, show_traceback)
    return BAD_INPUT
  except KeyboardInterrupt:
    if show_traceback or verbose():
      traceback.print_exc()
    print('interrupted (Ctrl-C): stopped at once; checkpoints already written are kept',
          file=sys.stderr, flush=True)
    return INTERRUPTED


def main(fn: Callable[[list[str]], int]) -> Callable[..., int]:
  """Decorates a tool's `main(argv) -> exit code`: called with argv=None it reads
  sys.argv[1:]; lmjax's own errors become one line and exit code 2 (`run`), with the
  traceback under --verbose."""

  @functools.wraps(fn)
  def wrapper(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(fn, argv, show_traceback=verbose(argv))

  return wrapper


def plot_runs(argv, doc: str, read: Callable[[str], object], plot: Callable,
              compare_help: str = "another run's workdir (dashed)") -> int:
  """The command line of a tool that plots a run's metrics (tools/plot_*.py): --workdir,
  --out, --label and --compare / --compare_label another run; read(workdir) -> the run's
  rows, plot([(label, rows), ...], out) -> the path written (printed)."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split('\n\n', 1)[1])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True, help='image file to write (.png, .svg)')
  parser.add_argument('--label', default=None, help='the run\'s name (default: its workdir)')
  parser.add_argument('--compare', default=None, help=compare_help)
  parser.add_argument('--compare_label', default=None)
  add_verbose_flag(parser)
  args = parser.parse_args(argv)
  name = lambda workdir, label: label or os.path.basename(os.path.normpath(workdir))
  runs = [(name(args.workdir, args.label), read(args.workdir))]
  if args.compare:
    runs.append((name(args.compare, args.compare_label), read(args.compare)))
  print(plot(runs, args.out))
  return 0
