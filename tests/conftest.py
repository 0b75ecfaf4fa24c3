"""Test setup: a fake 8-device CPU mesh, full-precision matmuls for parity, offline transformers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity is judged against transformers' fp32 eager path; TPU/GPU-style reduced-precision matmuls
# would hide real differences behind rounding noise.
jax.config.update("jax_default_matmul_precision", "highest")
