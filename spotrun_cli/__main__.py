"""Entry point of `python -m spotrun_cli`."""

import sys

from spotrun_cli.cli import main

sys.exit(main())
