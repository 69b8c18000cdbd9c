"""`python -m layerboost.bench`."""

import sys

from .cli import main

sys.exit(main())
