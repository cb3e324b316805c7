"""The ``backend`` pytest fixture, parametrized over :func:`tlcore.testing.selected_backends`."""
from __future__ import annotations

import pytest

import tlcore as tl

from . import selected_backends


@pytest.fixture(params=selected_backends(), scope="session")
def backend(request) -> str:
    """A backend name; its framework is imported once per session."""
    name = request.param
    tl.get_backend(name)  # fails loudly (BackendNotFoundError) when a requested backend is missing
    return name
