"""The recipe layer: YAML recipes, typed and checked (:mod:`compresscnn.recipe.schema`)."""

from compresscnn.recipe.schema import *  # noqa: F401,F403  (the schema's public names)
from compresscnn.recipe.schema import __all__  # noqa: F401
