"""Exceptions raised by diffusers-mixdq.

Every problem with user input (a plan, a config, a model that does not match a plan) is reported as a
:class:`MixDQError`, a :class:`ValueError` subclass, so ``except ValueError`` keeps working for callers that do
not know this package. Each message names what is wrong and how to fix it.
"""

from __future__ import annotations


class MixDQError(ValueError):
    """Base class of every error this package raises for bad input."""


class PlanFormatError(MixDQError):
    """The plan file or object is malformed: bad JSON, unknown format version, unknown dtype, missing field."""


class PlanMismatchError(MixDQError):
    """The plan does not fit the model it is applied to: other architecture, unknown or missing layers."""


class PlanSourceError(MixDQError):
    """The plan could not be found or read from where it was said to be."""


class PlanPushError(MixDQError):
    """A plan could not be published to the Hub (authentication, permissions, server or network failure)."""
