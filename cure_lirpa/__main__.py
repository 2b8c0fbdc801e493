"""``python -m cure_lirpa`` (and ``torchrun -m cure_lirpa``): the ``cure-lirpa`` command."""

from .cli import main

main()
