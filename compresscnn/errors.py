"""User-facing errors.

Every error a user can fix (a bad recipe, a missing file, an impossible rank) is a
:class:`CompressError`: the CLI prints its one-line message and exits with code 2. Anything
else is an internal error (exit 1, traceback only under ``--debug``).
"""

from __future__ import annotations


class CompressError(Exception):
    """A problem with the user's input. The message is one line that names what and where."""

    exit_code = 2


class RecipeError(CompressError):
    """A recipe that does not fit the schema (the message starts with the key path)."""


class MethodError(CompressError):
    """An unknown decomposition method, or one that cannot take the given layer."""


class RankError(CompressError):
    """A rank that is malformed or impossible for the layer it is applied to."""


class ModelError(CompressError):
    """An unknown model spec, or weights that do not fit the architecture."""


class DataError(CompressError):
    """A missing, unreadable or empty dataset."""


class CheckpointError(CompressError):
    """A missing, corrupt, unsafe or mismatched checkpoint / weights file."""


class OutputError(CompressError):
    """An output folder that cannot be used: not ours to replace, in use by another run,
    an impossible path, or no space left on its file system."""


class NoSpaceError(OutputError):
    """The file system of an output ran out of space (or quota) while a run wrote to it."""


class StreamError(CompressError):
    """Standard output cannot be written (redirected to a full device, or a pipe whose
    reader has gone): not a problem of any file the run writes."""
