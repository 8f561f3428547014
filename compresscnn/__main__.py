"""``python -m compresscnn`` (also what ``torchrun -m compresscnn`` runs)."""

import sys

from .cli import main

sys.exit(main())
