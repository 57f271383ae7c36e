"""`python -m pdserve.router ...` = `pdserve router ...`."""

import sys

from pdserve.router.cli import main

sys.exit(main())
