"""``python -m gateway.cli``: the same as the ``mailward`` console command."""

import sys

from gateway.cli import main

sys.exit(main())
