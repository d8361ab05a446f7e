"""Logging set-up for the CLI, and Python warnings routed through logging into the report.

Warnings are not silenced wholesale (that would hide them from the user and from child
processes alike): a short list of known, harmless messages from the libraries we drive is
filtered; every other warning goes to the ``py.warnings`` logger, is kept for
``report.json`` (``warnings``), and reaches the terminal only with ``--verbose``.
"""

from __future__ import annotations

import builtins
import logging
import sys
import warnings

# (message regex, category name): harmless notices from torch/onnx that a user can't act on.
KNOWN_HARMLESS = (
    (r".*TorchScript.*deprecated.*", "DeprecationWarning"),
    (r".*torch\.onnx\.export.*dynamo.*", "DeprecationWarning"),
    (r".*Converting a tensor to a Python.*", "TracerWarning"),
    (r".*TypedStorage is deprecated.*", "UserWarning"),
    (r".*enable_nested_tensor is True.*", "UserWarning"),
)
MAX_CAPTURED = 50


class _Capture(logging.Handler):
    """Keeps the distinct warning messages of this process, in order."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
        if msg and msg not in self.messages and len(self.messages) < MAX_CAPTURED:
            self.messages.append(msg)


_capture = _Capture()


def filter_known_warnings() -> None:
    for pattern, category in KNOWN_HARMLESS:
        # torch's own categories (TracerWarning) are matched as Warning, by message
        warnings.filterwarnings("ignore", message=pattern, category=getattr(builtins, category, Warning))


def setup_logging(verbose: bool, debug: bool) -> None:
    """Console logging for the CLI; warnings routed through logging and captured."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    filter_known_warnings()
    # Re-route even when an earlier call did (a host that swapped warnings.showwarning in
    # between, as test runners do, would otherwise keep the warnings).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    wlog = logging.getLogger("py.warnings")
    if _capture not in wlog.handlers:
        wlog.addHandler(_capture)
    # Library warnings reach the terminal only when asked for; they are in the report anyway.
    wlog.propagate = verbose or debug


def captured_warnings() -> list[str]:
    """The distinct warnings this process logged (for the report)."""
    return list(_capture.messages)
