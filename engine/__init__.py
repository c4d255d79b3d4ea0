"""fusedrl.engine: rollout -> pack -> score -> advantages -> update."""
