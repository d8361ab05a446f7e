"""Goal-driven compression: search per-layer bits, sparsity and the quantize method for the
smallest (or fastest) model that passes the recipe's gates.

``compress.tune.config`` holds the typed ``search:`` section (no torch import);
``sensitivity`` measures each layer's effect on the output, ``allocate`` solves the per-layer
knapsack, ``search`` runs candidates end to end through ``compress.pipeline.run`` and writes
the result as a plain recipe.
"""
