"""The one exception type that reaches the user as a one-line message.

Every check on user input (files, flags, model directories, cluster resources) raises
`UserError` with a message that says what is wrong, the offending value, and what to do.
The CLI prints it as ``neuroscan: error: <message>`` and exits non-zero, with no traceback.
Anything else that escapes is a bug and keeps its traceback. The module is a leaf so that
every package (prompts, workers, aggregator) can raise it without importing the driver.
`one_of` checks a flag's value against its choices; `make_dir` and `file_out` are the checks
every command's ``--out`` goes through; `tell` is how a command says a line that is not an
error (a notice, a step of its start); `user_line` is an error's line, wherever it was raised.
"""

from __future__ import annotations

import sys
from pathlib import Path


def tell(line: str) -> None:
    """One line to the user, on stderr, at once."""
    print(line, file=sys.stderr, flush=True)


class UserError(Exception):
    """Bad input, fixable by the user; the message is shown as one line."""


def user_line(err: BaseException) -> str | None:
    """The line of a `UserError`, raised here or in a Ray actor (Ray re-raises it wrapped in
    the remote traceback, an error of both kinds that keeps the original as ``cause``, maybe
    twice: raised in a call whose result another call took as an argument); None for any other
    error."""
    while isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    return str(err) if isinstance(err, UserError) else None


def one_of(flag: str, value, choices, hint: str = "") -> None:
    """Stop with one line unless ``value`` is one of ``choices`` (``hint``: a further way out)."""
    if value not in choices:
        raise UserError(f"{flag} {value!r} is not known: use one of {', '.join(choices)}{hint}")


def make_dir(directory: Path, out: Path | None = None) -> None:
    """Create ``directory`` and its parents for ``--out out`` (by default the directory itself;
    else a file to be written in it), or stop with one line."""
    if out is None and directory.is_file():
        raise UserError(f"--out {directory} is a file: give a directory")
    out = directory if out is None else out
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"--out {out}: cannot create {directory} ({err.strerror or err}): choose a writable place"
        ) from None


def file_out(out: Path, example: str, suffix: str | None = None) -> None:
    """Check ``--out out``, a file about to be written (ending in ``suffix`` if given;
    ``example`` is a file name to suggest), and create its directory; or stop with one line."""
    if suffix and out.suffix != suffix:
        raise UserError(f"--out {out} must end in {suffix}")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: name the file to write, e.g. {out / example}")
    make_dir(out.parent, out)
