"""python -m titans: the `titans` command."""

import sys

from .cli import main

sys.exit(main())
