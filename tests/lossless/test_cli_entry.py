"""The fast pack/unpack entry point: same calls, messages and exit codes as the typer CLI,
without importing typer, click or pydantic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from compress.commands import entry
from compress.commands import pack as pack_module

# command lines the fast path takes, each with a different combination of options
FAST = [
    ["pack", "m.safetensors"],
    ["pack", "m.safetensors", "out.czip"],
    ["pack", "m.safetensors", "-o", "o.czip", "--force"],
    ["pack", "--force", "m.safetensors", "--level=7", "--threads", "2", "out.czip"],
    ["pack", "m.safetensors", "--output=o.czip", "--level", "19", "--level", "5", "--debug"],
    ["pack", "m.safetensors", "--threads", "007"],
    ["unpack", "m.czip"],
    ["unpack", "m.czip", "back.safetensors", "--threads=3", "--force"],
    ["unpack", "--output", "x.onnx", "m.czip", "--debug"],
]
# left to typer: help, usage errors, values typer refuses or parses its own way
TYPER = [
    ["pack"],
    ["pack", "--help"],
    ["unpack", "a", "--help"],
    ["pack", "a", "b", "c"],
    ["pack", "a", "--level", "x"],
    ["pack", "a", "--level", "-1"],
    ["pack", "a", "--threads", "+2"],
    ["pack", "a", "--threads"],
    ["pack", "a", "-ox.czip"],
    ["pack", "a", "-o="],
    ["pack", "--", "a"],
    ["pack", "a", "--force=1"],
    ["pack", "a", "--bogus"],
    ["pack", ""],
    ["unpack", "a", "--level", "3"],
    ["run", "r.yaml", "m.pt"],
    ["--help"],
    [],
]


@pytest.fixture
def calls(monkeypatch):
    """Record what pack/unpack are called with instead of running them."""
    seen: list[tuple] = []

    def fake_pack(src, dst, level, threads, *, output=None, force=False):
        seen.append(("pack", src, dst, level, threads, output, force))
        return 0

    def fake_unpack(src, dst, *, output=None, force=False, threads=None):
        seen.append(("unpack", src, dst, threads, output, force))
        return 0

    monkeypatch.setattr(pack_module, "pack", fake_pack)
    monkeypatch.setattr(pack_module, "unpack", fake_unpack)
    return seen


@pytest.mark.parametrize("argv", FAST, ids=" ".join)
def test_fast_path_makes_the_call_typer_makes(argv, calls, cli) -> None:
    parsed = entry.parse_fast(argv)
    assert parsed is not None
    assert entry.run_fast(*parsed) == 0
    code, _, _ = cli(*argv)
    assert code == 0
    assert len(calls) == 2 and calls[0] == calls[1]


@pytest.mark.parametrize("argv", TYPER, ids=lambda a: " ".join(a) or "(none)")
def test_everything_else_goes_to_typer(argv) -> None:
    assert entry.parse_fast(argv) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["pack", "{tmp}/missing.safetensors"],
        ["pack", "{tmp}/m.safetensors", "--threads", "0"],
        ["pack", "{tmp}/m.safetensors", "{tmp}/a.czip", "-o", "{tmp}/b.czip"],
        ["pack", "{tmp}/m.safetensors", "--level", "40", "--force"],
        ["pack", "{tmp}/m.txt"],
        ["unpack", "{tmp}/m.safetensors"],
        ["unpack", "{tmp}"],
    ],
    ids=["missing", "threads 0", "two outputs", "level 40", "suffix", "not a container", "directory"],
)
def test_errors_read_the_same_on_both_paths(argv, tmp_path, cli, capsys) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(64, dtype=np.float32)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    parsed = entry.parse_fast(argv)
    assert parsed is not None
    code = entry.run_fast(*parsed)
    fast_err = capsys.readouterr().err
    typer_code, _, typer_err = cli(*argv)
    assert code == typer_code == 2
    assert fast_err == typer_err and fast_err.startswith("error: ")


def test_an_internal_error_is_reported_not_raised(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pack_module, "unpack", broken)
    assert entry.run_fast(*entry.parse_fast(["unpack", "x.czip"])) == 3
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: disk on fire" in err and "Traceback" not in err


def test_pack_and_unpack_processes_import_no_typer(tmp_path) -> None:
    from safetensors.numpy import save_file

    src = tmp_path / "m.safetensors"
    save_file({"w": (np.arange(4096, dtype=np.float32) * 1e-3).astype(np.float32)}, str(src))
    probe = (
        "import sys\n"
        "from compress.commands.entry import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('typer', 'click', 'pydantic', 'torch') if m in sys.modules)\n"
        "print('RESULT', code, heavy)\n"
    )
    for args in (
        ["pack", str(src), str(tmp_path / "m.czip")],
        ["unpack", str(tmp_path / "m.czip"), str(tmp_path / "back.safetensors")],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert "RESULT 0 []" in proc.stdout, (proc.stdout, proc.stderr)
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    # the console script's module also answers everything else through typer
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "pack", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and "--threads" in proc.stdout
