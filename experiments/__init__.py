"""Entry points: infer, bench, report (Hydra-composed; see conf/)."""
