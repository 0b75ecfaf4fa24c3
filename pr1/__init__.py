"""pr1: GRPO with the Perception-R1 visual perception reward for Qwen2.5-VL, in JAX/Flax."""
