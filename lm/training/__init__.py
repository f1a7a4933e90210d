"""Training machinery every stage shares: optimizer and schedule, checkpoints, the loop."""
