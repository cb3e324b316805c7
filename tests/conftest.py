"""Shared fixtures: ``backend`` runs a test on every selected backend (``TLCORE_TEST_BACKENDS``)."""
import importlib.util

if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401  (torch must be imported before tensorflow in one process)

import pytest  # noqa: E402

pytest.register_assert_rewrite("tlcore.testing")

from tlcore.testing.fixtures import backend  # noqa: E402,F401
