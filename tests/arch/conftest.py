"""Fixtures of the architecture-coverage tests: the zoo's models, trained once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory):
    """``zoo_models(name) -> Path`` of the trained state_dict (trained on first use, seeded)."""
    from tests.arch.harness import train_model

    folder = tmp_path_factory.mktemp("arch_models")
    return lambda name: train_model(name, folder)
