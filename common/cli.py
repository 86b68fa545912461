"""The command-line contract of every stage: a user's mistake ends in one line naming the input
and the fix; each kind of ending has its exit code.

    def main(argv=None) -> int:
        return run_cli(_main, argv)

Mistakes are a missing file or directory, a file of the wrong kind, a value that cannot work
(``UserError``), unreadable YAML; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys

DATA_ERROR_EXIT = 1      # corrupted shards or checkpoints: the message names the file
MISTAKE_EXIT = 2         # a user's mistake: the message names the input and the fix
PLAN_EXIT = 3            # the memory plan says the run does not fit its hardware
NUMERIC_EXIT = 4         # training stopped on numerical faults or latent collapse (the last good checkpoint kept)
REQUEUE_EXIT = 75        # EX_TEMPFAIL: checkpointed on a signal, run me again (the sbatch script requeues)


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
