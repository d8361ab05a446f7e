"""The `compress` command line: a thin launcher over the Python API.

Only this module prints. Heavy imports (torch, onnx, onnxruntime) happen inside the
commands, so `compress --help` answers fast. Exit codes: 0 gates passed, 1 a gate failed,
2 bad input, 3 internal error (a message, and a traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

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
    """Turn library errors into a message and an exit code (the words are
    :func:`compress.commands.entry.failure_exit_code`'s, shared with the fast pack/unpack)."""
    from compress.commands.entry import failure_exit_code

    try:
        yield
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as err:
        raise typer.Exit(failure_exit_code(err, debug, _err)) from None


def _setup_logging(verbose: bool, debug: bool) -> None:
    from compress.logs import setup_logging

    setup_logging(verbose, debug)


def stage_notes(row: dict) -> list[str]:
    """A stage's extra console lines: its notes and its parameter coverage."""
    from compress.coverage import coverage_line

    metrics = row.get("metrics") or {}
    lines = list(metrics.get("notes", []))
    if metrics.get("coverage"):
        lines.append(coverage_line(row["stage"], metrics["coverage"]))
    return lines


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
        for extra in stage_notes(row):  # coverage: what the stage handled, what it left alone
            print(f"      {extra}", file=self.stream, flush=True)


def _check_junit_path(junit: Path | None) -> None:
    """A --junit path must be writable before any work starts (its folder is never created)."""
    if junit is None:
        return
    from compress.errors import InputError
    from compress.junit import check_writable

    try:
        check_writable(junit)
    except OSError as err:
        raise InputError(f"--junit {junit}: cannot write there ({err.strerror}: {err.filename})") from None


@contextlib.contextmanager
def _junit_on_error(junit: Path | None, suite: str):
    """A run that stops with an error still leaves a JUnit file: one failed case holding
    the message, so CI shows why instead of nothing."""
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as err:
        if junit is not None:
            from compress.errors import CompressError
            from compress.junit import error_checks, write_junit

            code = err.exit_code if isinstance(err, CompressError) else EXIT_INTERNAL
            message = str(err) if isinstance(err, CompressError) else f"{type(err).__name__}: {err}"
            with contextlib.suppress(OSError):
                write_junit(junit, suite, error_checks(message, code))
        raise


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    model: Path = typer.Argument(
        ..., help="Model file: state_dict (+ recipe model.factory), TorchScript, or pickled module with --trust-model."
    ),
    out: Path | None = typer.Option(
        None, "-o", "--out", help="Output folder (default: recipe output.dir or runs/<name>)."
    ),
    force: bool = typer.Option(False, "--force", help="Redo every stage even when a cached result matches."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (no progress lines)."),
    trust_model: bool = typer.Option(
        False, "--trust-model", help="Allow unpickling a whole nn.Module (runs code from the file)."
    ),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Train with N processes (torchrun + DistributedDataParallel; gloo on CPU)."
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Where stages compute: cpu, cuda (cuda:N) or auto (CUDA when available)."
    ),
    memory: str = typer.Option(
        "auto",
        "--memory",
        help="low: a lower peak RSS for some time (GPFQ ~13% slower); fast: the C allocator as it is; "
        "auto: low for model files of 256 MB or more.",
    ),
    junit: Path | None = typer.Option(
        None, "--junit", help="Also write every gate and check as a JUnit XML test case (also on an error)."
    ),
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

        _check_junit_path(junit)
        init_from_env(device)
        if not is_main():
            as_json = False
            junit = None
        suite = f"compress run {recipe.stem}"
        with _junit_on_error(junit, suite):
            from compress.pipeline import run as run_pipeline
            from compress.recipe import load_recipe

            parsed = load_recipe(recipe)
            suite = f"compress run {parsed.name}"
            out_dir = out or Path(parsed.doc.output.dir or f"runs/{parsed.name}")
            reporter = None if as_json or not is_main() else _ConsoleReporter()
            result = run_pipeline(
                parsed,
                model,
                out_dir,
                force=force,
                trust_model=trust_model,
                reporter=reporter,
                device=device,
                memory=memory,
            )
        from compress.report import gate_line, stage_table, stage_table_note

        if junit is not None:
            from compress.junit import write_junit

            checks = result.report["gates"] + result.report["checks"]
            props = {f"{k}.sha256": v for k, v in result.report.get("artifact_sha256", {}).items()}
            write_junit(junit, suite, checks, result.report["wall_seconds"], properties=props)
        if not is_main():
            pass
        elif as_json:
            typer.echo(json.dumps(result.report, indent=2, default=str))
        else:
            table = stage_table(result.report["stages"])
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            for r in table:
                typer.echo("  ".join(c.rjust(w) for c, w in zip(r, widths)))
            if note := stage_table_note(result.report["stages"]):
                typer.echo(note)
            for g in result.report["gates"]:
                typer.echo(gate_line(g))
            typer.echo(f"artifacts: {out_dir}/  report: {out_dir / 'report.md'}  {out_dir / 'report.json'}")
            if "bundle_sha256" in result.report:
                typer.echo(f"bundle.czip SHA-256: {result.report['bundle_sha256']}")
            for f in result.failures:
                typer.echo(f"FAILED {gate_line(f)}")
        if not result.passed:
            raise typer.Exit(EXIT_GATE)


@app.command()
def tune(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML; its gates are the goal, its optional search: section the space."
    ),
    model: Path = typer.Argument(..., help="Model file, as for `compress run`."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output folder (default: runs/<name>-tune)."),
    objective: str | None = typer.Option(
        None, "--objective", help="packed_size, onnx_size or latency (overrides search.objective)."
    ),
    candidates: int | None = typer.Option(
        None, "--candidates", min=1, help="End-to-end candidate runs (overrides search.budget.candidates)."
    ),
    seconds: float | None = typer.Option(
        None, "--seconds", min=1, help="Wall-time budget (overrides search.budget.seconds)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the search result as JSON on stdout (no progress lines)."
    ),
    trust_model: bool = typer.Option(
        False, "--trust-model", help="Allow unpickling a whole nn.Module (runs code from the file)."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log what the stages do."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Search per-layer bits, sparsity and method for the smallest (or fastest) model that passes the
    recipe's gates; write it as recipe.tuned.yaml. Exit 1 (with the best candidate) when nothing passes."""
    _setup_logging(verbose, debug)
    with _guard(debug):
        from compress.recipe import load_recipe
        from compress.report import format_gate_distance, format_gate_value
        from compress.tune.config import SearchSpec
        from compress.tune.search import resolve_objective
        from compress.tune.search import tune as run_tune

        parsed = load_recipe(recipe)
        spec = parsed.doc.search or SearchSpec()
        updates: dict = {}
        if objective is not None:
            updates["objective"] = objective
        budget = spec.budget.model_dump()
        if candidates is not None:
            budget["candidates"] = candidates
        if seconds is not None:
            budget["seconds"] = seconds
        try:
            spec = SearchSpec.model_validate(spec.model_dump() | updates | {"budget": budget})
        except Exception as err:  # pydantic's message names the bad option
            from compress.errors import InputError

            raise InputError(f"compress tune: bad option: {err}") from None
        out_dir = out or Path(f"runs/{parsed.name}-tune")
        goal = resolve_objective(parsed, spec)

        def progress(kind: str, payload) -> None:
            if as_json:
                return
            if kind == "phase":
                _err(f"-- {payload}")
                return
            c = payload
            value = c.metrics.get(goal)
            shown = "-" if value is None else (f"{value:.3f} ms" if goal == "latency" else f"{value:,.0f} B")
            fid = " ".join(f"{k} {c.metrics[k]:.4f}" for k in ("accuracy", "cosine") if k in c.metrics)
            verdict = (
                "error: " + c.error
                if c.error
                else "pass"
                if c.passed
                else "fail (" + ", ".join(f["gate"] for f in c.failures) + ")"
            )
            bits = " ".join(str(b) for b in c.layer_bits.values())
            _err(f"[{c.id}] {c.kind:8s} {c.variant}  bits {bits}  {shown}  {fid}  {verdict}  {c.seconds:.1f}s")

        result = run_tune(parsed, model, out_dir, spec=spec, trust_model=trust_model, progress=progress)
        if as_json:
            typer.echo(json.dumps(result.report, indent=2, default=str))
        else:
            from compress.html_report import tune_headline

            typer.echo(tune_headline(result.report))
            if result.chosen is not None:
                tuned = result.report.get("tuned_run") or {}
                typer.echo(
                    f"chosen: candidate {result.chosen.id} ({result.chosen.variant}), bits {result.chosen.layer_bits}"
                )
                typer.echo(f"recipe: {result.recipe_path}  (re-run: compress run {result.recipe_path} {model})")
                typer.echo(f"model: {tuned.get('out_dir')}  reproduced exactly: {tuned.get('reproduced')}")
            elif result.best is not None:
                b = result.best
                typer.echo(
                    f"FAILED no candidate passes the gates; best: candidate {b.id} ({b.variant}), bits {b.layer_bits}"
                    + (f" [{b.error}]" if b.error else "")
                )
                for g in result.report["missed_gates"]:
                    by = g.get("missed_by")
                    by_text = format_gate_distance(g["gate"], abs(by)) if by is not None else "n/a"
                    typer.echo(
                        f"FAILED {g['gate']}: measured {format_gate_value(g['gate'], g['measured'])}, "
                        f"limit {format_gate_value(g['gate'], g['limit'])}, missed by {by_text}"
                    )
                typer.echo(f"its recipe: {result.recipe_path}")
            else:
                typer.echo(
                    f"FAILED no candidate ran within the budget ({result.report['search_seconds']:.0f} s "
                    "spent before the first one); raise search.budget.seconds or narrow search.layers"
                )
            typer.echo(f"report: {out_dir / 'report.html'}  {out_dir / 'search.json'}")
        if not result.passed:
            raise typer.Exit(EXIT_GATE)


@app.command()
def validate(
    path: Path = typer.Argument(..., help="An .onnx model, or a device bundle (bundle.czip from `compress run`)."),
    data: Path | None = typer.Option(
        None, "--data", help=".npz with inputs 'x' and optional labels 'y' (not needed for a bundle)."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help=".npz with the expected 'outputs' for those inputs."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime intra-op threads."),
    max_latency_ms: float | None = typer.Option(
        None, "--max-latency-ms", help="Fail if the p50 latency of one sample is above this."
    ),
    min_agreement: float | None = typer.Option(
        None, "--min-agreement", help="Fail if top-1 agreement with the reference is below this."
    ),
    max_abs_error: float | None = typer.Option(
        None, "--max-abs-error", help="Fail if an output differs from the reference by more."
    ),
    runs: int = typer.Option(100, "--runs", min=1, help="Timed runs for the latency percentiles."),
    expect_sha256: str | None = typer.Option(
        None,
        "--expect-sha256",
        help="Refuse the file unless its SHA-256 is this (from report.json): authenticates "
        "a bundle against the run that made it; the bundle's own checksums only detect corruption.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    junit: Path | None = typer.Option(None, "--junit", help="Write the checks as JUnit XML (also on an error)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Validate a model on this device with onnxruntime alone (no torch): parity, accuracy, latency, memory."""
    with _guard(debug):
        from compress.validate import check_limits
        from compress.validate import validate as run_validation

        check_limits(
            min_agreement=min_agreement,
            max_latency_ms=max_latency_ms,
            max_abs_error=max_abs_error,
            expect_sha256=expect_sha256,
        )
        _check_junit_path(junit)
        with _junit_on_error(junit, f"compress validate {path.name}"):
            report = run_validation(
                path,
                data,
                reference,
                threads,
                max_latency_ms,
                min_agreement,
                max_abs_error,
                runs,
                expect_sha256=expect_sha256,
            )
        if junit is not None:
            from compress.junit import write_junit

            write_junit(
                junit,
                f"compress validate {path.name}",
                report["checks"],
                report["seconds"],
                properties={"sha256": report["sha256"]},
            )
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            env, lat = report["environment"], report["latency"]
            typer.echo(
                f"{path}: {report['model_bytes']:,} B model, {report['samples']} samples, "
                f"onnxruntime {env['onnxruntime']}, {threads} thread(s) on {env['cpu']}"
            )
            if "accuracy" in report:
                typer.echo(f"accuracy {report['accuracy']:.2%}")
            if "parity" in report:
                p = report["parity"]
                agreement = f"agreement {p['agreement']:.2%}, " if "agreement" in p else ""
                typer.echo(f"parity: {agreement}max abs error {p['max_abs_error']:.3g}, cosine {p['cosine']:.6f}")
            typer.echo(
                f"latency p50 {lat['latency_p50_ms']:.3f} ms, p90 {lat['latency_p90_ms']:.3f} ms, "
                f"p99 {lat['latency_p99_ms']:.3f} ms; peak memory {report['peak_rss_mb']:.0f} MB"
            )
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
        env = dict(
            os.environ, COMPRESS_EXIT_FILE=str(exit_file), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "compress",
            *args,
        ]
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
        parsed.check_plan()
        if show:
            typer.echo(parsed.to_yaml(), nl=False)
        names = (
            ", ".join(
                f"{s.name} ({s.config.method})" if isinstance(getattr(s.config, "method", None), str) else s.name
                for s in parsed.stages
            )
            or "no stages"
        )
        _err(f"{recipe}: valid ({names})")
        imports = parsed.imports()
        # A recipe runs the code it names: show every import so a reviewer sees it.
        _err("imports the run will make:" if imports else "imports the run will make: none")
        for loc, ref in imports:
            _err(f"  {'.'.join(map(str, loc))}: {ref}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of recipes (generated from the code; editors complete recipes from it)."""
    from compress.recipe import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def inspect(
    path: Path = typer.Argument(
        ..., help="A model (.pt / TorchScript), a stage folder, an .onnx file or a packed file."
    ),
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
            [
                t["name"],
                "x".join(map(str, t["shape"])) or "scalar",
                t["dtype"],
                f"{t['numel']:,}",
                f"{t['sparsity']:.1%}",
            ]
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
        dst: Path | None = typer.Argument(None, help="Output (default: SRC + '.czip')."),
        output: Path | None = typer.Option(None, "-o", "--output", help="Output file (same as DST)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
        level: int = typer.Option(3, help="zstd level for the coded streams."),
        threads: int | None = typer.Option(None, help="Threads (default: all cores)."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Losslessly pack model weights (ZipNN-style byte grouping + entropy coding)."""
        with _guard(debug):
            raise typer.Exit(pack_module.pack(src, dst, level, threads, output=output, force=force))

    @app.command()
    def unpack(
        src: Path = typer.Argument(..., help="A packed file."),
        dst: Path | None = typer.Argument(None, help="Output (default: SRC without '.czip', beside it)."),
        output: Path | None = typer.Option(None, "-o", "--output", help="Output file (same as DST)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
        threads: int | None = typer.Option(None, help="Decoding threads (default: all cores)."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Restore the byte-identical original of a packed file."""
        with _guard(debug):
            raise typer.Exit(pack_module.unpack(src, dst, output=output, force=force, threads=threads))


_register_pack_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
