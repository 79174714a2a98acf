"""``python -m framework.testing <strategy>``: the conformance kit on spawned ranks."""

import sys

from framework.testing.kit import main

sys.exit(main())
