"""A short run of benchmarks/container_fuzz.py (the full run is 100,000 inputs)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "benchmarks" / "container_fuzz.py"


@pytest.mark.slow
def test_mutated_containers_end_as_exit_0_or_2(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("container_fuzz", FUZZ)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    rng = random.Random(7)
    base = fuzz.seeds(tmp_path)
    path, out = tmp_path / "fuzz.czip", tmp_path / "out.bin"
    codes = []
    for _ in range(1500):
        path.write_bytes(fuzz.mutate(rng, rng.choice(base)))
        codes.append(fuzz.run_one(path, out))  # anything but InputError propagates
    assert set(codes) == {0, 2}
