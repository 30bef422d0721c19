"""``python -m quantize_jax``: the same as the ``quantize-jax`` command."""

import sys

from quantize_jax.cli import main

sys.exit(main())
