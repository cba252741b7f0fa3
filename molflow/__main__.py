"""``python -m molflow`` = the ``molflow`` command."""
import sys

from .cli import main

sys.exit(main())
