"""``python -m tlcore demo`` works like the ``tlcore`` console script."""
import sys

from tlcore.cli import main

sys.exit(main())
