"""The conformance kit (``kit``) and the long-lived test ranks (``rankpool``).

``python -m framework.testing <strategy>`` runs every check at world sizes 1-4.
"""

from framework.run.inputs import expected_sum
from framework.testing.kit import CHECKS, check_strategy, rank_input, run_checks

__all__ = ["CHECKS", "check_strategy", "expected_sum", "rank_input", "run_checks"]
