"""`python -m searchsvc` is the `searchsvc` command."""

import sys

from searchsvc.cli import main

sys.exit(main())
