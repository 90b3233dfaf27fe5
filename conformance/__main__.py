"""``python -m conformance``: run the conformance suite (see conformance/runner.py)."""

import sys

from conformance.runner import main

sys.exit(main())
