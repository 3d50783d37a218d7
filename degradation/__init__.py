"""Torch-free simulator of low-quality retinal fundus photographs (Cofe-Net degradation model and more).

>>> from degradation import cofe_degrader, load_recipe, soft_fov_mask
"""

from .functional import soft_fov_mask
from .recipe import Degrader, RecipeError, cofe_degrader, load_recipe, loads_recipe

__all__ = ["Degrader", "RecipeError", "cofe_degrader", "load_recipe", "loads_recipe", "soft_fov_mask"]
