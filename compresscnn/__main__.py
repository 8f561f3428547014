"""``python -m compresscnn`` (also what ``torchrun -m compresscnn`` runs)."""

import sys

from compresscnn.cli import main

sys.exit(main())
