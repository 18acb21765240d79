"""``python -m adam_monitor.cli``: the same as the ``adam-monitor`` command."""

import sys

from . import main

sys.exit(main())
