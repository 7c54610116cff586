"""Taming methods: objectives, the paper's method, baselines and the vector method.

Importing the package registers every method in :data:`flowtame.methods.taming.METHODS` (each module
registers the methods it defines), so a caller that picks a method by name needs no further import.
"""

from flowtame.methods import baselines as _baselines  # noqa: F401  (registers neggrad and selective-amnesia)
