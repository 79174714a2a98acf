"""Entry points: infer, bench, report (Hydra-composed; see conf/)."""

from framework.run.lifeline import follow_parent

follow_parent()  # a spawned rank imports this first: it must not outlive its launcher
