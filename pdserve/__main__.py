"""`python -m pdserve`: the same as `pdserve`."""

import sys

from pdserve.cli import main

sys.exit(main())
