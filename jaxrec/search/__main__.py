"""`python -m jaxrec.search`."""

import sys

from jaxrec.search.cli import main

sys.exit(main())
