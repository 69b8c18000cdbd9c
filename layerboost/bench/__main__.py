"""`python -m layerboost.bench`."""

import sys

from ..cli.bench import main

sys.exit(main())
