"""Shared fixtures: ``backend`` runs a test on every selected backend (``TLCORE_TEST_BACKENDS``)."""
import pytest

pytest.register_assert_rewrite("tlcore.testing")

from tlcore.testing.fixtures import backend  # noqa: E402,F401
