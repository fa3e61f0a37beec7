"""``python -m app CONFIG``: patch first, then run the CLI."""

from gevent import monkey

monkey.patch_all()

import sys

from app.cli import main

sys.exit(main())
