"""Error types that map onto the CLI's exit codes.

Library code raises these; only the CLI turns them into messages and exit codes:
0 every gate passed, 1 a gate failed, 2 bad input (recipe, model, data, paths),
3 an internal error.
"""

from __future__ import annotations


class CompressError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    exit_code = 3


class InputError(CompressError):
    """The user's input is wrong: recipe, model file, data, output folder."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe failed to parse or validate; the message names file, line and key."""


class ModelLoadError(InputError):
    """A model file could not be loaded or does not run on the declared input."""


class DataError(InputError):
    """A data source is missing, malformed or does not match the model."""


class StageError(CompressError):
    """A stage failed for a reason other than bad input."""


class GateFailure(CompressError):
    """One or more gates failed; carries the failed checks."""

    exit_code = 1

    def __init__(self, failures: list[dict]):
        self.failures = failures
        parts = [f"{f['gate']}: measured {f['measured']:.6g}, limit {f['limit']:.6g}" for f in failures]
        super().__init__("gate failed: " + "; ".join(parts))
