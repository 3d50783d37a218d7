"""Fixtures for the degradation tests: small synthetic fundus-like images (no data needed)."""

from __future__ import annotations

import pytest
from _deg_synth import make_fundus


@pytest.fixture(scope="session")
def fundus128():
    return make_fundus(128)


@pytest.fixture(scope="session")
def fundus256():
    return make_fundus(256)


@pytest.fixture(scope="session")
def fundus512():
    return make_fundus(512)
