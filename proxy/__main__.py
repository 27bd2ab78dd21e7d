"""``python -m moorage.proxy`` runs the ``moorage`` command."""

import sys

from .cli import main

sys.exit(main())
