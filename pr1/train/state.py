"""The learner's train state, born sharded: parameters, optimizer state and step on the mesh.

Parameters live as a pure dict of arrays (the NNX `Param` state of `Qwen25VL`);
`pr1.models.model_def.ModelDef` holds the static half (graph definition, config) and rebuilds the
module inside jitted functions. Shardings come from each parameter's logical axes through
`pr1.sharding` rules, so no host ever holds a full copy: weights are either loaded tensor by
tensor into place (`hf.load(..., mesh=)`) or initialized by a jitted init with `out_shardings`.
The optimizer state mirrors the parameter shardings.

Precision (the released recipe's mixed precision): the state holds the master params in
`ModelDef.dtype` (`model.param_dtype`, fp32 by default) and AdamW's moments in fp32; the jitted
steps and the sampler run the model on `ModelDef.compute_params(params)`, a cast to
`model.compute_dtype` (bf16 for the 7B recipe) made inside the program, so gradients reach the
fp32 masters. At lr 1e-6 an update is ~1e-4 of a weight's magnitude, below bf16's resolution
(2^-8): bf16 masters would keep ~98% of their elements unchanged over the whole run.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pr1 import sharding as sharding_lib
from pr1.models import hf
from pr1.models.model_def import ModelDef
from pr1.models.qwen2_5_vl import Qwen25VL


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


SCHEDULES = ("constant", "cosine")  # optim.schedule: after the warmup


def optimizer_config() -> ml_collections.ConfigDict:
    """The paper's optimizer: AdamW lr 1e-6, betas (0.9, 0.999), wd 1e-3, 5% warmup then constant,
    clip 1.0."""
    return ml_collections.ConfigDict(
        {
            "learning_rate": 1e-6,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 1e-3,
            "warmup_ratio": 0.05,
            "schedule": "constant",  # one of SCHEDULES
            "min_lr_ratio": 0.0,  # cosine floor as a fraction of learning_rate
            "max_grad_norm": 1.0,
            "freeze_vision_tower": False,
        }
    )


def check_optimizer_config(cfg: ml_collections.ConfigDict) -> None:
    """The optim section's checks; raises ValueError('optim.<key>: <why>')."""
    for ok, key, message in (
        (cfg.learning_rate > 0, "learning_rate", f"must be > 0, got {cfg.learning_rate}"),
        (cfg.schedule in SCHEDULES, "schedule", f"must be 'constant' or 'cosine', got {cfg.schedule!r}"),
        (0 <= cfg.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio}"),
        (cfg.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {cfg.max_grad_norm}"),
    ):
        if not ok:
            raise ValueError(f"optim.{key}: {message}")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = int(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            cfg.learning_rate, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio
        )
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
    if warmup == 0:
        return after
    # Linear warmup from 0 reaches the full rate at step `warmup`, as verl's constant-with-warmup does.
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def fp32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with its state created in fp32 and kept in the dtypes it was created with, forever.

    optax makes Adam's moments in the params' dtype and lets the update promote them (a bf16 `mu`
    turns fp32 after step 1): the update step would compile twice, a resume would restore the
    step-0 dtypes, and a bf16 second moment cannot decay by (1 - b2) = 1e-3 per step. Whatever
    the params' dtype, the moments here are fp32 and the update casts each leaf back to it.
    """

    def to_f32(x):
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def init(params):
        return tx.init(jax.tree.map(to_f32, params))

    def update(updates, state, params=None):
        updates, new_state = tx.update(updates, state, params)
        return updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, params=None
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with fp32 moments (`fp32_state`); with `freeze_vision_tower`
    the vision params get zero updates."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=jnp.float32,
        ),
    )
    if cfg.freeze_vision_tower:
        if params is None:
            raise ValueError("freeze_vision_tower needs the params tree to label the vision tower")
        labels = {
            k: jax.tree.map(lambda _: "frozen" if k == "visual" else "train", v) for k, v in params.items()
        }
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return fp32_state(tx)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(
    tx: optax.GradientTransformation, params_abstract, param_shardings, mesh: Mesh
) -> TrainState:
    """Shardings of a whole TrainState: optimizer moments follow their parameter, the rest replicates.

    An optimizer-state leaf belongs to a parameter when the dict keys of its path end with that
    parameter's path and the shapes agree; this holds through chains, masks and multi_transform.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {
        _dict_keys(path): (sh, leaf.shape)
        for (path, sh), leaf in zip(
            jax.tree_util.tree_flatten_with_path(param_shardings)[0], jax.tree.leaves(params_abstract)
        )
    }
    longest = max(len(k) for k in by_path)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for n in range(min(longest, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated

    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    opt_shardings = jax.tree_util.tree_map_with_path(pick, opt_abstract)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)


def abstract_params(model_def: ModelDef) -> dict:
    """The master params' shapes in `model_def.dtype`, as a pure dict of ShapeDtypeStruct (no memory)."""
    pure = model_def.abstract_state.to_pure_dict()
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, model_def.dtype), pure)


def run_optimizer(config: ml_collections.ConfigDict, model_def: ModelDef) -> optax.GradientTransformation:
    """The optimizer of a training run (`config.optim`): one optimizer step per mini-batch, so its
    schedule spans train.steps x train.mini_batches steps."""
    steps = config.train.steps * config.train.mini_batches
    return make_optimizer(config.optim, steps, abstract_params(model_def))


def abstract_train_state(
    model_def: ModelDef, tx: optax.GradientTransformation, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES
) -> tuple[TrainState, TrainState]:
    """(state, shardings): the TrainState of a run as ShapeDtypeStructs carrying its shardings, and
    those shardings. Nothing is allocated: it is the checkpoint's restore target, and what the
    memory planner and the recipe tests lower the steps for."""
    params = abstract_params(model_def)
    shardings = state_shardings(tx, params, model_def.param_shardings(mesh, rules), mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params)
    )
    placed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return placed, shardings


def create_train_state(
    params,
    tx: optax.GradientTransformation,
    model_def: ModelDef,
    mesh: Mesh,
    rules=sharding_lib.DEFAULT_RULES,
) -> tuple[TrainState, TrainState]:
    """A TrainState around already-sharded `params`; the optimizer state is created in place on the mesh."""
    param_sh = model_def.param_shardings(mesh, rules)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = state_shardings(tx, abstract, param_sh, mesh)
    params = jax.device_put(params, param_sh)
    init = jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        out_shardings=shardings,
    )
    return init(params), shardings


def init_params(model_def: ModelDef, mesh: Mesh, seed: int = 0, rules=sharding_lib.DEFAULT_RULES):
    """Random parameters created directly in their sharded layout (no full host copy)."""
    shardings = model_def.param_shardings(mesh, rules)

    def init():
        model = Qwen25VL(model_def.config, dtype=model_def.dtype, rngs=nnx.Rngs(seed))
        return nnx.state(model, nnx.Param).to_pure_dict()

    return jax.jit(init, out_shardings=shardings)()


def load_params(path: str, model_def: ModelDef, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES):
    """Hugging Face weights read tensor by tensor straight into the sharded layout."""
    model = hf.load(path, dtype=model_def.dtype, mesh=mesh, rules=rules)
    return nnx.state(model, nnx.Param).to_pure_dict()
