"""``python -m minilora`` is the ``minilora`` command."""
import sys

from .cli import main

sys.exit(main())
