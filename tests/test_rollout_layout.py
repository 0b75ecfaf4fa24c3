"""Rollout layout at pod scale (issue 18, item 4): the embedded sampler decodes with the learner's
FSDP-sharded params; unless XLA hoists the gather out of the decode loop, every decode step
all-gathers the weights. Checked on the compiled HLO of the jitted rollout on 8 fake CPU devices
with fsdp=8 (the debug config's tiny model): no all-gather producing a parameter-sized array sits
inside a while-loop body; the parameter gathers are hoisted in front of the loops (once per rollout).
This is XLA's choice at this shape; at 7B the same check should be run on the real mesh, and the
hoisted copy (the full weights per device for the rollout) counted by the memory planner."""

import os
import re
import sys

import jax
import jax.numpy as jnp

from pr1 import sharding
from pr1.bench import memory
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.model_def import ModelDef

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import debug as debug_config  # noqa: E402

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_CALLS = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+(?:, %?[\w.\-]+)*)\}?"
)
_ALL_GATHER = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(")


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO module text → {computation name: its instruction lines}."""
    out, name = {}, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            name = m.group(1)
            out[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            out[name].append(line)
    return out


def reachable(comps: dict[str, list[str]], roots) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            for m in _CALLS.finditer(line):
                todo.extend(x.strip().lstrip("%") for x in m.group(1).split(","))
    return seen


def all_gathers(hlo: str) -> tuple[list, list, int]:
    """(inside, outside, loop_matmuls): (computation, result shape) of every all-gather inside a
    while body (nested calls included) and outside any, and how many matmuls run inside loops."""
    comps = computations(hlo)
    bodies = {m.group(1) for lines in comps.values() for line in lines for m in _WHILE.finditer(line)}
    in_loops = reachable(comps, bodies)
    inside, outside = [], []
    for c, lines in comps.items():
        for line in lines:
            m = _ALL_GATHER.search(line)
            if m:
                (inside if c in in_loops else outside).append(
                    (c, tuple(int(x) for x in m.group(2).split(",") if x))
                )
    matmuls = sum(1 for c in in_loops for line in comps[c] if " dot(" in line or "convolution(" in line)
    return inside, outside, matmuls


def gathers_in_loops(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    return all_gathers(hlo)[0]


def _control_loop(variant: bool):
    """A loop multiplying by an fsdp-sharded weight each iteration; with `variant` the weight
    changes inside the loop (sharded), so its gather cannot be hoisted out of the body."""
    mesh = sharding.make_mesh(1, 8, 1)
    w_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    x_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @jax.jit
    def loop(w, x):
        def body(i, c):
            w, x = c
            if variant:
                w = jax.lax.with_sharding_constraint(w * 1.01, w_sh)
            full = jax.lax.with_sharding_constraint(w, x_sh)
            return w, jnp.tanh(x @ full)

        return jax.lax.fori_loop(0, 4, body, (w, x))[1]

    w = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=w_sh)
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=x_sh)
    return gathers_in_loops(loop.lower(w, x).compile().as_text())


def test_hlo_checker_on_controls():
    """The checker itself: a gather XLA must keep in the body is found; a loop-invariant weight's
    gather is hoisted by XLA here, and then none is reported."""
    assert any(shape == (64, 64) for _, shape in _control_loop(variant=True))
    assert not any(shape == (64, 64) for _, shape in _control_loop(variant=False))


def test_decode_loop_body_gathers_no_parameter(tmp_path):
    c = debug_config.get_config(str(tmp_path))
    c.data.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens = 8, 2, 4
    c.data.max_prompt_length = 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    model_config = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    mesh = sharding.make_mesh(1, 8, 1)
    model_def = ModelDef.create(
        model_config, dtype=jnp.dtype(c.model.param_dtype), compute_dtype=jnp.dtype(c.model.compute_dtype)
    )
    state, _, _ = memory.abstract_train_state(c, model_def, mesh)
    lowered, _ = memory.lower_rollout(c, model_def, mesh, state.params, model_config)
    inside, outside, loop_matmuls = all_gathers(lowered.compile().as_text())
    sharded = {
        tuple(x.shape) for x in jax.tree.leaves(state.params) if any(ax is not None for ax in x.sharding.spec)
    }
    assert sharded, "nothing is fsdp-sharded: the check would be vacuous"
    assert loop_matmuls > 0, "no matmul inside a while loop: the decode loop was not found"
    in_loop = [(c_, s) for c_, s in inside if s in sharded]
    assert not in_loop, f"{len(in_loop)} parameter all-gathers inside loop bodies, e.g. {in_loop[:5]}"
    # Where the gathers went: hoisted before the loops, once per rollout (every device then holds
    # the gathered weights for the whole rollout; pr1.bench.memory must count that copy).
    assert sum(s in sharded for _, s in outside) >= len(sharded) // 2
