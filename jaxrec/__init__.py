"""jaxrec: the PP-ShiTuV2 image-recognition feature extractor in pure JAX/Flax.

Submodules are imported explicitly (``from jaxrec import models``) so that importing the
package stays cheap and one broken optional dependency never breaks the rest.
"""

__version__ = "0.1.0"
