"""Build: calibrate -> sense -> allocate, producing plans from a pipeline and prompts."""

from .calibrate import record_input_ranges

__all__ = ["record_input_ranges"]
