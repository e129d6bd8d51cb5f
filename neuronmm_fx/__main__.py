"""``python -m neuronmm_fx``: the command line of :mod:`neuronmm_fx.cli`."""

import sys

from neuronmm_fx.cli import main

sys.exit(main())
