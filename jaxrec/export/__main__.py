"""`python -m jaxrec.export`: see `jaxrec.export.cli`."""

import sys

from jaxrec.export.cli import main

sys.exit(main())
