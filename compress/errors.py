"""One error type for everything a user can fix, each kind with its documented exit code.

The CLI formats these once (one paragraph, no traceback unless ``--debug``); the library raises
them with a message that names the file, layer or field and says what to do.
"""

from __future__ import annotations


class CompressError(Exception):
    """Base class: ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(CompressError):
    """Bad usage or recipe: an unknown field, an impossible setting (exit 2)."""

    exit_code = 2


class InputError(CompressError):
    """An input is missing or unreadable: model, data file, checkpoint (exit 3)."""

    exit_code = 3


class GateError(CompressError):
    """A quality gate failed (exit 4)."""

    exit_code = 4


class TrainingError(CompressError):
    """Training (distillation) diverged: a non-finite loss (exit 5). Nothing is exported."""

    exit_code = 5


class JobError(CompressError):
    """A rank of a data-parallel job (torchrun) failed or stopped answering: every other rank
    ends with this (exit 6) instead of waiting. Finished blocks are kept; --resume continues."""

    exit_code = 6
