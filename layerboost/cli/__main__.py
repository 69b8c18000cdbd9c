"""`python -m layerboost.cli`."""

import sys

from . import main

sys.exit(main())
