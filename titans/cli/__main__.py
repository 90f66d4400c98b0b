"""python -m titans.cli (what torchrun runs: torchrun ... -m titans.cli train ...)."""

import sys

from . import main

sys.exit(main())
