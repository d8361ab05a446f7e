"""The `compress` command line: a thin launcher over the Python API.

Only this module prints. Heavy imports (torch, onnx, onnxruntime) happen inside the
commands, so `compress --help` answers fast. Exit codes: 0 gates passed, 1 a gate failed,
2 bad input, 3 internal error (a message, and a traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="compress",
    help="Compress a trained PyTorch model: distill, prune, quantize, pack losslessly, export to ONNX - every stage measured and gated.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


@contextlib.contextmanager
def _guard(debug: bool):
    """Turn library errors into a message and an exit code."""
    from compress.errors import CompressError

    try:
        yield
    except typer.Exit:
        raise
    except CompressError as err:
        if debug:
            traceback.print_exc()
        _err(f"error: {err}")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted: finished stages are kept and reused by a re-run; the unfinished one is not")
        raise typer.Exit(130) from None
    except Exception as err:  # an internal error: say so plainly
        if debug:
            traceback.print_exc()
        else:
            _err(f"internal error: {type(err).__name__}: {err}\n(re-run with --debug for the traceback)")
        raise typer.Exit(EXIT_INTERNAL) from None


def _setup_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import warnings

    if not debug:
        warnings.filterwarnings("ignore")


class _ConsoleReporter:
    """Progress lines: rich status on a terminal, plain lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._status = None
        if self.tty:
            from rich.console import Console

            self.console = Console(file=self.stream)

    def stage_started(self, index: int, total: int, name: str) -> None:
        text = f"[{index}/{total}] {name} ..."
        if self.tty:
            self._status = self.console.status(text)
            self._status.start()
        else:
            print(text, file=self.stream, flush=True)

    def stage_finished(self, index: int, total: int, row: dict) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        parts = [f"[{index}/{total}] {row['stage']}", "reused" if row.get("cached") else f"{row['seconds']:.1f}s"]
        if "accuracy" in row:
            parts.append(f"accuracy {row['accuracy']:.2%}")
        if "agreement" in row:
            parts.append(f"agreement {row['agreement']:.2%}")
        parts.append(f"size {row['size_bytes']:,} B")
        if "latency_p50_ms" in row:
            parts.append(f"p50 {row['latency_p50_ms']:.3f} ms")
            if row.get("latency_vs_float"):  # below 1: faster than the float model on onnxruntime
                vs = f"{row['latency_vs_float']:.2f}x float latency"
                if row.get("latency_vs_float_b32"):
                    vs += f" (batch 32: {row['latency_vs_float_b32']:.2f}x)"
                parts.append(vs)
        line = "  ".join(parts)
        if self.tty:
            self.console.print(f"[green]✓[/green] {line}")
        else:
            print(line, file=self.stream, flush=True)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    model: Path = typer.Argument(..., help="Model file: state_dict (+ recipe model.factory), TorchScript, or pickled module with --trust-model."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default: recipe output.dir or runs/<name>)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage even when a cached result matches."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (no progress lines)."),
    trust_model: bool = typer.Option(False, "--trust-model", help="Allow unpickling a whole nn.Module (runs code from the file)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with N processes (torchrun + DistributedDataParallel; gloo on CPU)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write every gate and check as a JUnit XML test case."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log what the stages do."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run a recipe on a model; exit 0 when every gate passes, 1 when one fails."""
    _setup_logging(verbose, debug)
    from compress.distributed import launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(_launch_torchrun(nproc))
    with _distributed_exit(), _guard(debug):
        from compress.distributed import init_from_env, is_main

        init_from_env()
        if not is_main():
            as_json = False
        from compress.pipeline import run as run_pipeline
        from compress.recipe import load_recipe
        from compress.report import gate_line, stage_table

        parsed = load_recipe(recipe)
        out_dir = out or Path(parsed.doc.output.dir or f"runs/{parsed.name}")
        reporter = None if as_json or not is_main() else _ConsoleReporter()
        result = run_pipeline(parsed, model, out_dir, force=force, trust_model=trust_model, reporter=reporter)
        if junit is not None and is_main():
            from compress.junit import write_junit

            checks = result.report["gates"] + result.report["checks"]
            write_junit(junit, f"compress run {parsed.name}", checks, result.report["wall_seconds"])
        if not is_main():
            pass
        elif as_json:
            typer.echo(json.dumps(result.report, indent=2, default=str))
        else:
            table = stage_table(result.report["stages"])
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            for r in table:
                typer.echo("  ".join(c.rjust(w) for c, w in zip(r, widths)))
            for g in result.report["gates"]:
                typer.echo(gate_line(g))
            typer.echo(f"artifacts: {out_dir}/  report: {out_dir / 'report.md'}  {out_dir / 'report.json'}")
            for f in result.failures:
                typer.echo(f"FAILED {gate_line(f)}")
        if not result.passed:
            raise typer.Exit(EXIT_GATE)


@app.command()
def validate(
    path: Path = typer.Argument(..., help="An .onnx model, or a device bundle (bundle.czip from `compress run`)."),
    data: Optional[Path] = typer.Option(None, "--data", help=".npz with inputs 'x' and optional labels 'y' (not needed for a bundle)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help=".npz with the expected 'outputs' for those inputs."),
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime intra-op threads."),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="Fail if the p50 latency of one sample is above this."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Fail if top-1 agreement with the reference is below this."),
    max_abs_error: Optional[float] = typer.Option(None, "--max-abs-error", help="Fail if an output differs from the reference by more."),
    runs: int = typer.Option(100, "--runs", min=1, help="Timed runs for the latency percentiles."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write the checks as JUnit XML."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Validate a model on this device with onnxruntime alone (no torch): parity, accuracy, latency, memory."""
    with _guard(debug):
        from compress.validate import validate as run_validation

        report = run_validation(path, data, reference, threads, max_latency_ms, min_agreement, max_abs_error, runs)
        if junit is not None:
            from compress.junit import write_junit

            write_junit(junit, f"compress validate {path.name}", report["checks"], report["seconds"])
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            env, lat = report["environment"], report["latency"]
            typer.echo(f"{path}: {report['model_bytes']:,} B model, {report['samples']} samples, "
                       f"onnxruntime {env['onnxruntime']}, {threads} thread(s) on {env['cpu']}")
            if "accuracy" in report:
                typer.echo(f"accuracy {report['accuracy']:.2%}")
            if "parity" in report:
                p = report["parity"]
                agreement = f"agreement {p['agreement']:.2%}, " if "agreement" in p else ""
                typer.echo(f"parity: {agreement}max abs error {p['max_abs_error']:.3g}, cosine {p['cosine']:.6f}")
            typer.echo(f"latency p50 {lat['latency_p50_ms']:.3f} ms, p90 {lat['latency_p90_ms']:.3f} ms, "
                       f"p99 {lat['latency_p99_ms']:.3f} ms; peak memory {report['peak_rss_mb']:.0f} MB")
            from compress.report import gate_line

            for c in report["checks"]:
                typer.echo(gate_line(c))
        if not report["passed"]:
            raise typer.Exit(EXIT_GATE)


def _launch_torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun with ``nproc`` processes; return rank 0's exit code."""
    import subprocess
    import tempfile

    args = [a for a in sys.argv[1:]]
    i = next(i for i, a in enumerate(args) if a == "--nproc" or a.startswith("--nproc="))
    del args[i : i + (1 if "=" in args[i] else 2)]
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = dict(os.environ, COMPRESS_EXIT_FILE=str(exit_file), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "compress", *args]
        proc = subprocess.run(cmd, env=env)
        if exit_file.is_file():
            return int(exit_file.read_text().strip() or EXIT_INTERNAL)
        _err(f"error: the {nproc}-process run failed (torchrun exit code {proc.returncode})")
        return EXIT_INTERNAL


@contextlib.contextmanager
def _distributed_exit():
    """Under the --nproc launcher, rank 0 reports its exit code through a file (torchrun
    would flatten every failure to 1) and every rank leaves the process group."""
    exit_file = os.environ.get("COMPRESS_EXIT_FILE")
    code = EXIT_OK
    try:
        yield
    except typer.Exit as done:
        code = done.exit_code
        if not exit_file:
            raise
    finally:
        from compress.distributed import is_main, shutdown

        if exit_file and "torch" in sys.modules and is_main():
            Path(exit_file).write_text(str(code))
        if "torch" in sys.modules:
            shutdown()
    if exit_file:
        raise typer.Exit(EXIT_OK)


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    show: bool = typer.Option(False, "--show", help="Print the recipe back with every default filled in."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Validate a recipe without running it."""
    with _guard(debug):
        from compress.recipe import load_recipe

        parsed = load_recipe(recipe)
        if show:
            typer.echo(parsed.to_yaml(), nl=False)
        names = ", ".join(s.name for s in parsed.stages) or "no stages"
        _err(f"{recipe}: valid ({names})")


@app.command()
def schema() -> None:
    """Print the JSON Schema of recipes (generated from the code; editors complete recipes from it)."""
    from compress.recipe import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A model (.pt / TorchScript), a stage folder, an .onnx file or a packed file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    trust_model: bool = typer.Option(False, "--trust-model", help="Allow unpickling a whole nn.Module."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Show what a model or artifact holds: tensors, shapes, dtypes, sparsity, size."""
    with _guard(debug):
        from compress.inspect import inspect_path

        info = inspect_path(path, trust_model=trust_model)
        if as_json:
            typer.echo(json.dumps(info, indent=2, default=str))
            return
        typer.echo(f"{info['path']}: {info['kind']}, {info['file_bytes']:,} bytes on disk")
        rows = [["tensor", "shape", "dtype", "params", "sparsity"]] + [
            [t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['numel']:,}", f"{t['sparsity']:.1%}"]
            for t in info["tensors"]
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        typer.echo(
            f"total: {info['parameters']:,} values, {info['nonzeros']:,} nonzero "
            f"({1 - info['nonzeros'] / max(info['parameters'], 1):.1%} sparse)"
        )
        for key, value in info.get("extra", {}).items():
            typer.echo(f"{key}: {value}")


def _register_pack_commands() -> None:
    from compress.commands import pack as pack_module  # light: imports heavy deps lazily

    @app.command()
    def pack(
        src: Path = typer.Argument(..., help="File to pack: .safetensors, .onnx or a stage model .pt."),
        dst: Optional[Path] = typer.Argument(None, help="Output (default: SRC + '.czip')."),
        level: int = typer.Option(3, help="zstd level for the coded streams."),
        threads: Optional[int] = typer.Option(None, help="Threads (default: all cores)."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Losslessly pack model weights (ZipNN-style byte grouping + entropy coding)."""
        with _guard(debug):
            raise typer.Exit(pack_module.pack(src, dst, level, threads))

    @app.command()
    def unpack(
        src: Path = typer.Argument(..., help="A packed file."),
        dst: Optional[Path] = typer.Argument(None, help="Output (default: the original name)."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Restore the byte-identical original of a packed file."""
        with _guard(debug):
            raise typer.Exit(pack_module.unpack(src, dst))


_register_pack_commands()


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # keep library warnings off the user's terminal
    app()


if __name__ == "__main__":
    main()
