"""`python -m pdserve.engine.kernels`: build (or find) the C++ kernel library; exit 1 where it cannot."""

import logging
import sys

from pdserve.engine.kernels import load

logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(0 if load() else 1)
