"""How every command ends: `cli.run(main)` in place of absl's `app.run(main)`.

A user error, one of USER_ERRORS raised by our checks (a flag or config value out of range, a
missing or malformed file, samples that came out NaN), is printed as one line on stderr,

    sgjax.sample: error: --num_samples=0 must be >= 1.

and the process exits with status 2 (EXIT_USER_ERROR), like argparse. Anything else is a bug
or an outage and keeps its traceback (absl's exit status 1). absl's own flag errors and
`app.UsageError` keep absl's handling (usage text, status 1), and a command's own exit status
(train's 75 after a preemption) passes through.

Set SGJAX_TRACEBACK=1 to get the traceback of a user error as well: to see which check raised
it, or when a ValueError from inside a library is really a bug.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Sequence

from absl import app

EXIT_USER_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
TRACEBACK_ENV = "SGJAX_TRACEBACK"

Main = Callable[[Sequence[str]], Any]


def program_name() -> str:
  """'sgjax.sample' under `python -m sgjax.sample`, else the script's file name."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return spec.name.removesuffix(".__main__")
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sgjax"


def guard(main: Main, prog: str | None = None) -> Main:
  """`main`, with a user error turned into one stderr line and SystemExit(EXIT_USER_ERROR)."""

  @functools.wraps(main)
  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise
      # One line even for a message that lists things on several.
      message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
      print(f"{prog or program_name()}: error: {message or type(e).__name__}", file=sys.stderr,
            flush=True)
      raise SystemExit(EXIT_USER_ERROR) from None

  return guarded


def run(main: Main, prog: str | None = None) -> None:
  """absl's app.run(main) (flag parsing and all), with user errors reported as `guard` does."""
  app.run(guard(main, prog))
