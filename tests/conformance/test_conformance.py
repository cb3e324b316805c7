"""The shared conformance kit (``tlcore.testing``), run on every selected backend."""
from tlcore.testing import parametrize_with_checks


@parametrize_with_checks()
def test_conformance(backend, check):
    check(backend)
