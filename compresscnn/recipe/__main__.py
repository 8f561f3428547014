"""``python -m compresscnn.recipe``: the recipe reference, the registered methods, or a recipe checked."""

import sys

from compresscnn.recipe.reference import main

if __name__ == "__main__":
    sys.exit(main())
