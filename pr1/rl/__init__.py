"""The RL algorithm: GRPO advantages, the clipped policy loss and its aggregation, as pure JAX functions."""
