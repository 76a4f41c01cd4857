"""From a model and a budget to the best compressed model, with a report.

>>> from vitslim.compress import compress, write_report
>>> result = compress(model, "images/", "speedup=3")
>>> write_report(result, "report/", "my model")
"""

from vitslim.compress.report import write_report
from vitslim.compress.search import CandidateResult, SearchResult, Target, compress
from vitslim.recipes import BUILTIN_RECIPES, Recipe, load_recipe, recipe_from_dict, save_recipe

__all__ = [
           "BUILTIN_RECIPES",
           "CandidateResult",
           "Recipe",
           "SearchResult",
           "Target",
           "compress",
           "load_recipe",
           "recipe_from_dict",
           "save_recipe",
           "write_report",
]
