"""`python -m pdserve.launch`: the same as `pdserve launch`."""

import sys

from pdserve.launch.cluster import main

sys.exit(main())
