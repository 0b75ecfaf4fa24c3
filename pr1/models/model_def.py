"""The model binding: `ModelDef`, the static half of a `Qwen25VL` (graph definition, config, dtypes)
that rebuilds the module around a pure dict of parameters inside jitted functions.

It sits with the model because every user of parameters needs it: the learner's state and steps
(`pr1.train`), the embedded sampler (`pr1.rollout.sampler`), export and evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pr1 import sharding as sharding_lib
from pr1.models import hf
from pr1.models.config import Qwen25VLConfig
from pr1.models.qwen2_5_vl import Qwen25VL


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static part of the model: rebuilds a `Qwen25VL` around a params dict inside jit.

    `dtype` is the dtype of the stored (master) params; `compute_dtype` the one the forward runs in
    (`compute_params` casts to it; defaults to `dtype`).
    """

    graphdef: Any
    abstract_state: Any
    config: Qwen25VLConfig
    dtype: Any
    compute_dtype: Any = None

    @classmethod
    def create(cls, config: Qwen25VLConfig, dtype=jnp.bfloat16, compute_dtype=None) -> "ModelDef":
        abstract = nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract, nnx.Param)
        dtype = jnp.dtype(dtype)
        return cls(
            graphdef, state, config, dtype, jnp.dtype(compute_dtype) if compute_dtype is not None else dtype
        )

    def compute_params(self, params):
        """`params` with every floating array cast to the compute dtype (a no-op where it already is).

        Called inside jitted functions: the cast is part of the program, so its gradient flows back
        to the master params in their own dtype, and nothing is stored twice between steps.
        """
        dt = self.compute_dtype

        def cast(x):
            return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x

        return jax.tree.map(cast, params)

    def bind(self, params) -> Qwen25VL:
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def param_shardings(self, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES):
        """A pure dict of NamedSharding, one per parameter, from its logical axes."""
        specs = {}
        for path, var in nnx.to_flat_state(self.abstract_state):
            name = hf.hf_name(path)
            specs[path] = sharding_lib.named_sharding(
                var.get_metadata().get("logical_axes"), var.shape, mesh, rules, name=name
            )
        return _unflatten(specs)


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
