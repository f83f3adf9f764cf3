"""Rewards: the one scoring interface (`sources`) and the built-in reward functions (`functions`, the gold
sentiment scorer among them)."""
