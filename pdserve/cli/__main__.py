"""`python -m pdserve.cli`: the same as `pdserve`."""

import sys

from pdserve.cli import main

sys.exit(main())
