"""A user's mistake on any command line ends in one line naming the input and the fix, exit 2.

    def main(argv=None) -> int:
        return run_cli(_main, argv)

Mistakes are a missing file or directory, a file of the wrong kind (``UserError``), unreadable
YAML; corrupted data and checkpoints keep their own exit code 1, and anything else is a bug and
keeps its traceback. Shared by data_prep and pipeline (the later stage imports the earlier one).
"""
from __future__ import annotations

import sys

MISTAKE_EXIT = 2


class UserError(ValueError):
    """What the user gave cannot work: the message names the input and what to do."""


def describe(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: no such file or directory"
    if isinstance(err, (NotADirectoryError, IsADirectoryError)) and err.filename:
        return f"{err.filename}: {'not a directory' if isinstance(err, NotADirectoryError) else 'is a directory'}"
    return " ".join(str(err).split())              # one line


def run_cli(main, argv=None) -> int:
    try:
        return main(argv)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        print(f"error: {describe(err)}", file=sys.stderr, flush=True)
        return MISTAKE_EXIT
