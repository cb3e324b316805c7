"""The shared conformance suite, run on every selected backend (see ``tlcore.testing``)."""
from tlcore.testing.suite_api import *  # noqa: F401,F403
from tlcore.testing.suite_errors import *  # noqa: F401,F403
from tlcore.testing.suite_freeze import *  # noqa: F401,F403
