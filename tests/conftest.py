"""Shared fixtures: ``backend`` runs a test on every selected backend (``TLCORE_TEST_BACKENDS``)."""
import pytest

pytest.register_assert_rewrite("tlcore.testing")

from tlcore.testing.fixtures import backend  # noqa: E402,F401

#: scripts the tests run in processes of their own (they set up devices or process groups at import)
collect_ignore_glob = ["*_worker.py"]
