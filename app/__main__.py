"""``python -m app CONFIG``: patch first, then run the CLI."""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)  # watchdog: see app/reload.py

import sys

from app.cli import main

sys.exit(main())
