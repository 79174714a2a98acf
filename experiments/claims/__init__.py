"""The seed-claims study: ``python -m experiments.claims`` writes ``REPORT.md`` here."""
