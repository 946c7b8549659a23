"""``python -m halo_balance.export``: see :mod:`halo_balance.export`."""

from ..cli import run
from . import main

run(main)
