"""`python -m chatdistill.cli`: the same as the `chatdistill` command."""

import sys

from chatdistill.cli import main

sys.exit(main())
