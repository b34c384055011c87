"""``python -m diffusers_mixdq.cli``: the ``mixdq`` command line."""

from . import main

main()
