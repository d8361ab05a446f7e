"""Run import-linter's contracts (pyproject.toml) over the package as it installs.

The stage folders live at the repository root but install as ``compress.distill`` etc.
(setuptools ``package-dir``); import-linter reads packages from the file system, so this
builds a throw-away tree of symbolic links with the installed layout and lints that. It
also fails when a module of the core is missing from the "core imports no stage" contract,
so a new core module cannot slip past it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("distill", "prune", "quantize", "export")


def main() -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = {
        m for contract in config["contracts"] if contract["type"] == "forbidden" for m in contract["source_modules"]
    }
    on_disk = {
        f"compress.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "compress").iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").is_file()
    }
    missing = sorted(on_disk - core)
    if missing:
        print(f"lint_imports: core modules missing from the contract in pyproject.toml: {', '.join(missing)}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "compress"
        pkg.mkdir()
        for entry in (ROOT / "compress").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        for stage in STAGES:
            (pkg / stage).symlink_to(ROOT / stage)
        env = dict(os.environ, PYTHONPATH=tmp)
        cmd = [str(Path(sys.executable).parent / "lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
