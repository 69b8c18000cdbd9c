"""`python -m layerboost.heal`."""

import sys

from ..cli.heal import main

sys.exit(main())
