"""``python -m ckptavg``: the command-line tool (see :mod:`ckptavg.cli`)."""

import sys

from .cli import main

sys.exit(main())
