"""Training: sharded train state, jitted steps, the run loop and its checkpoints."""
