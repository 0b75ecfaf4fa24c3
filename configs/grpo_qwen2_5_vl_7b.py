"""The paper's baseline: the same recipe with the accuracy-only reward (no perception term, no judge).

python -m pr1.train --config configs/grpo_qwen2_5_vl_7b.py --workdir DIR --config.model.path=...
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "perception_r1_qwen2_5_vl_7b",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "perception_r1_qwen2_5_vl_7b.py"),
)
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)


def get_config(arg: str | None = None):
    c = _recipe.get_config(arg)
    c.rewards.weights.perception = 0.0
    c.rewards.judge.url = ""  # no judge server; the (unused) perception term is never requested
    return c
