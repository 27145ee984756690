"""`python -m perceiver_ar_jax.convert`: see `perceiver_ar_jax/convert/__init__.py` and `--help`."""

import sys

from perceiver_ar_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
