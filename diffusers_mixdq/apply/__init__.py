"""Apply: *how* a plan becomes quantized modules (optimum-quanto lives behind ``backend``)."""

from .inspect import quantized_layers

__all__ = ["quantized_layers"]
