"""The seed-claims study: ``python -m experiments.claims`` writes ``results/claims/REPORT.md``."""
