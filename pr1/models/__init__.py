"""Qwen2.5-VL in Flax NNX, its position ids, and Hugging Face checkpoint I/O."""
