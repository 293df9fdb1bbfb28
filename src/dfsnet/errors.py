"""The exceptions dfsnet raises for a user's mistake.

The CLI prints these (and OS errors about paths) as one line with exit code 2; any other
exception is a bug and keeps its traceback. Each subclasses the builtin a Python caller would
expect (``ValueError``, ``TypeError``), so ``except ValueError`` keeps working, as
scikit-learn's conventions ask.
"""
from __future__ import annotations

__all__ = ["DfsnetError", "UserError", "InputError", "InputTypeError", "NotFoundError", "MissingDependencyError"]


class DfsnetError(Exception):
    """Base of dfsnet's own exceptions."""


class UserError(DfsnetError):
    """A mistake in what the user asked for (a flag, a path, a name)."""


class InputError(UserError, ValueError):
    """An argument with a wrong value: shape, range, unknown name, damaged or mismatched file."""


class InputTypeError(UserError, TypeError):
    """An argument of the wrong type."""


class NotFoundError(UserError, KeyError):
    """A name or id that does not exist (an image id, a stage)."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(UserError, ImportError):
    """An optional package that what the user asked for needs is not installed (the message names it)."""
