"""The one base of every error a user can cause: :class:`OpenSDError`.

Bad input (a parameter out of range, a prompt over budget, a file that is not a model,
a corrupt checkpoint) raises a subclass of :class:`OpenSDError` whose message names the
problem and what is allowed. The CLI prints it as one line and exits 2; the server
answers it with a 4xx (``status``) and the message as ``detail``. Any other exception
is a bug in opensd: the CLI prints one line and a hint to rerun with ``--debug``, and
the server answers 500 with a request id that its log repeats next to the traceback.

It subclasses :class:`ValueError`, so code that caught ``ValueError`` still works.
"""

from __future__ import annotations


class OpenSDError(ValueError):
    """A user-facing error: bad input or a bad file. ``status`` is the HTTP status the server answers."""

    status: int = 422
    kind: str = "ValidationError"


class InputFileError(OpenSDError):
    """A file given as input (an image, a mask, a prompt file) is missing, unreadable or too large."""

    kind = "InputFileError"
