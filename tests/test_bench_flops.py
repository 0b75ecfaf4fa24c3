"""The MFU numerator: FLOP counts agree with the model's actual weight shapes and a hand count."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pr1.bench import flops
from pr1.bench.train_step import bench_config
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.model_def import ModelDef


def _kernel_sizes(config):
    """Sizes of every matmul kernel of the model, split into text (+ head) and vision."""
    text, vision = 0, 0
    for path, var in nnx.to_flat_state(ModelDef.create(config, jnp.float32).abstract_state):
        if path[-1] != "kernel":
            continue
        size = int(np.prod(var.shape))
        if path[0] == "visual":
            vision += size
        else:
            text += size
    return text, vision


def test_matmul_params_equal_the_models_kernels():
    for config in (Qwen25VLConfig.from_hf_dict(tiny_hf_config()), bench_config()):
        text, vision = _kernel_sizes(config)
        assert flops.text_matmul_params(config) == text
        # Per patch: every kernel but the merger's runs once per patch; the merger's once per 4 patches.
        v = config.vision
        merged = v.hidden_size * v.spatial_merge_size**2
        merger = merged * merged + merged * v.out_hidden_size
        assert (
            flops.vision_matmul_params_per_patch(config)
            == (vision - merger) + merger / v.spatial_merge_size**2
        )


def test_forward_flops_by_hand_on_the_tiny_model():
    config = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    # tiny: d=64, 4 heads x 16, 2 kv heads, ffn 128, 2 layers, vocab 512.
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128
    n = 2 * per_layer + 64 * 512
    t = 10
    want = 2 * n * t + 2 * 4 * t * t * 64
    assert flops.forward_flops(config, [t]) == want
    assert flops.train_flops(config, [t, t]) == 3 * 2 * want
