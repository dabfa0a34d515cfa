"""One way for the command-line tools (tools/, data/) to fail on bad input: a single `error: ...` line on stderr
and exit code 2, no traceback.

    from cli import ArgParser, UsageError, run
    if __name__ == "__main__":
        sys.exit(run(main))
"""
from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Bad input: a missing or malformed file, an argument out of range."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose own errors (a missing or unknown argument) are a UsageError, not a usage block."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run(main, argv=None, errors: tuple[type[BaseException], ...] = ()) -> int:
    """main(argv) with UsageError, OSError and `errors` turned into one `error:` line and exit code 2."""
    try:
        return main(argv)
    except (UsageError, OSError, *errors) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
