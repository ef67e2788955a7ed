"""``python -m tests.guest``: see :mod:`tests.guest.cli`."""

import sys

from tests.guest.cli import main

sys.exit(main())
