"""``python -I -m edgeq.device OP``: the same entry point as the zipapp's."""

import sys

from .protocol import main

sys.exit(main())
