"""The ``compress`` executable's entry point: ``pack`` and ``unpack`` start without typer.

Building the typer application imports typer, click and (through typer's annotation
adapters) pydantic: about 0.3 CPU-s before any byte is read, as much as packing 100 MB
of bf16 weights (benchmarks/lossless.py, whole-process columns). A plain
``compress pack SRC [DST] [-o OUT] [--force] [--level N] [--threads N] [--debug]`` (and
the same for ``unpack``) is recognised here and run directly, with the library imported
only as far as the codec needs. Every other command line (other commands, ``--help``,
an unknown or malformed option, a missing argument, a value typer would refuse) goes to
:mod:`compress.cli` untouched, so help texts, usage errors and their exit codes stay
typer's own. The options recognised must match the typer signatures in
:mod:`compress.cli` (tests/lossless/test_cli_entry.py checks that both give the same call).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_INTERNAL = 3

# option -> (keyword, takes an integer value) for each fast-path command; flags take none
_VALUE_OPTIONS: dict[str, dict[str, tuple[str, bool]]] = {
    "pack": {
        "-o": ("output", False),
        "--output": ("output", False),
        "--level": ("level", True),
        "--threads": ("threads", True),
    },
    "unpack": {"-o": ("output", False), "--output": ("output", False), "--threads": ("threads", True)},
}
_FLAGS = {"--force": "force", "--debug": "debug"}
_PLAIN_INT = re.compile(r"\d{1,9}")  # anything else (signs, spaces, '_', huge) is left to typer's parser


def _stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def failure_exit_code(err: BaseException, debug: bool, echo: Callable[[str], None] = _stderr_line) -> int:
    """Say why a command stopped (one line on stderr; a traceback only with ``debug``) and
    return its exit code: the error's own for a :class:`~compress.errors.CompressError`,
    130 for an interrupt, 3 for anything else (an internal error).

    Shared by the typer commands (:func:`compress.cli._guard`) and the fast path here, so
    both print the same words.
    """
    import traceback

    from compress.errors import CompressError

    if isinstance(err, CompressError):
        if debug:
            traceback.print_exc()
        echo(f"error: {err}")
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        echo("interrupted: finished stages are kept and reused by a re-run; the unfinished one is not")
        return 130
    if debug:
        traceback.print_exc()
    else:
        echo(f"internal error: {type(err).__name__}: {err}\n(re-run with --debug for the traceback)")
    return EXIT_INTERNAL


def parse_fast(argv: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """``(command, keyword arguments)`` of a plain pack/unpack command line, or ``None``
    when typer must parse it (see the module docstring)."""
    if not argv or argv[0] not in _VALUE_OPTIONS:
        return None
    command, options = argv[0], _VALUE_OPTIONS[argv[0]]
    kw: dict[str, Any] = {"output": None, "force": False, "threads": None, "debug": False}
    if command == "pack":
        kw["level"] = 3
    positional: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg or arg == "-":
            return None
        if not arg.startswith("-"):
            positional.append(arg)
            continue
        if arg in _FLAGS:
            kw[_FLAGS[arg]] = True
            continue
        name, eq, value = arg.partition("=")
        if name not in options or (eq and not name.startswith("--")):
            return None  # --help, --, unknown options, -oVALUE: typer's business
        if not eq:
            if i >= len(argv) or not argv[i] or argv[i].startswith("-"):
                return None
            value = argv[i]
            i += 1
        key, is_int = options[name]
        if is_int:
            if not _PLAIN_INT.fullmatch(value):
                return None
            kw[key] = int(value)
        elif value:
            kw[key] = Path(value)
        else:
            return None
    if not 1 <= len(positional) <= 2:
        return None
    kw["src"] = Path(positional[0])
    kw["dst"] = Path(positional[1]) if len(positional) == 2 else None
    return command, kw


def _lean_process() -> None:
    """Settings for a short pack/unpack process, made before numpy is imported.

    numpy's OpenBLAS starts one thread per core at import and they spin while idle
    (2.5% of an unpack's CPU samples under ``perf``, and part of the start-up); pack and
    unpack use no BLAS, so one is enough (a value the user set is kept). The cyclic
    garbage collector is switched off: these processes hold a bounded set of buffers and
    make no cycles worth collecting (its passes were 1% of an unpack's samples).
    """
    import gc
    import os

    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # not OMP_*: torch, if ever loaded, keeps its threads
        os.environ.setdefault(var, "1")
    gc.disable()


def run_fast(command: str, kw: dict[str, Any]) -> int:
    """Run a parsed pack/unpack exactly as the typer command would; returns the exit code."""
    kw = dict(kw)
    debug = kw.pop("debug")
    _lean_process()
    try:
        from compress.commands import pack as pack_module

        if command == "pack":
            return pack_module.pack(
                kw["src"], kw["dst"], kw["level"], kw["threads"], output=kw["output"], force=kw["force"]
            )
        return pack_module.unpack(kw["src"], kw["dst"], output=kw["output"], force=kw["force"], threads=kw["threads"])
    except (Exception, KeyboardInterrupt) as err:
        return failure_exit_code(err, debug)


def main() -> None:
    """The ``compress`` console script (and ``python -m compress``)."""
    parsed = parse_fast(sys.argv[1:])
    if parsed is None:
        from compress.cli import main as typer_main

        typer_main()
        return
    sys.exit(run_fast(*parsed))
