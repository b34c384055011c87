"""Deprecated module: ``mixdq eval``, ``mixdq demo`` and ``mixdq build`` live in :mod:`diffusers_mixdq.cli`.

Kept only for ``_demo_scoring``, which ``benchmarks/builder_cost.py`` imports from here; use
:func:`diffusers_mixdq.demo.scorer.scorer_with_real_features` instead. Remove this module once nothing imports it.
"""

from .demo.scorer import scorer_with_real_features as _demo_scoring

__all__ = ["_demo_scoring"]
