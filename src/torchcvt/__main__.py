"""``python -m torchcvt``: the same as the ``cvt`` command."""

import sys

from .cli import main

sys.exit(main())
