"""What every pr1 command line shares: an error is one line naming what to fix, exit code 2.

The commands (`pr1.train`, `pr1.eval`, `pr1.annotate`, `pr1.analyze`, `pr1.export`, `pr1.plot`)
report a bad flag, a missing or unreadable file and a bad value as `<prog>: <what to fix>` on one
line of stderr and exit 2; a traceback is kept for bugs (errors nobody asked the user to fix).
"""

from __future__ import annotations

import argparse
import sys

USAGE_EXIT = 2


def one_line(error: BaseException | str) -> str:
    """The message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(error).split())


def fail(prog: str, error: BaseException | str) -> int:
    """Prints `<prog>: <error>` as one line on stderr; returns the exit code (2) for main to return."""
    print(f"{prog}: {one_line(error)}", file=sys.stderr)
    return USAGE_EXIT


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the whole usage block) and points at --help."""

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: {one_line(message)} (--help for usage)\n")


def absl_flags_parser(prog: str):
    """A `flags_parser` for absl's app.run: a bad or missing flag is one line and exit 2 instead of
    absl's "FATAL Flags parsing error" block and exit 1."""
    from absl import flags

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(fail(prog, f"bad flag: {e} (--helpshort for usage)"))

    return parse
