"""Rollout layout at pod scale (issue 18, item 4): the embedded sampler decodes with the learner's
FSDP-sharded params; unless XLA hoists the gather out of the decode loop, every decode step
all-gathers the weights. Checked on the compiled HLO of the jitted rollout on 8 fake CPU devices
with fsdp=8 (the debug config's tiny model): no all-gather producing a parameter-sized array sits
inside a while-loop body; the parameter gathers are hoisted in front of the loops (once per rollout).
This is XLA's choice at this shape; at 7B the same check should be run on the real mesh, and the
hoisted copy (the full weights per device for the rollout) counted by the memory planner."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pr1 import sharding
from pr1.bench import memory
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.model_def import ModelDef
from pr1.rollout.sampler import EmbeddedEngine
from pr1.train import state as state_lib

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


@pytest.mark.parametrize("weights_layout", ["gathered", "learner"])
def test_decode_loop_body_gathers_no_parameter(tmp_path, weights_layout):
    """ "gathered": the rollout lays its weights out without the batch axes before the loops, so no
    loop can gather them. "learner": the loops read the FSDP-sharded params and it is XLA's CPU
    compiler that hoists the gathers (the TPU compiler does not: it streams the shards around the
    ring inside the decode loop; see the module docstring of pr1.rollout.sampler)."""
    c = debug_config.get_config(str(tmp_path))
    c.rollout.weights_layout = weights_layout
    c.data.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens = 8, 2, 4
    c.data.max_prompt_length = 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    model_config = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    mesh = sharding.make_mesh(1, 8, 1)
    model_def = ModelDef.create(
        model_config, dtype=jnp.dtype(c.model.param_dtype), compute_dtype=jnp.dtype(c.model.compute_dtype)
    )
    state, _ = state_lib.abstract_train_state(model_def, state_lib.run_optimizer(c, model_def), mesh)
    lowered, _, weights = memory.lower_rollout(c, model_def, mesh, state.params, model_config)
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
    # The planner's row for the gathered copy: every weight whole per device, in the compute dtype
    # (this mesh has no tensor axis to keep), or nothing when the learner's layout is read.
    compute = jnp.dtype(c.model.compute_dtype).itemsize
    whole = sum(math.prod(x.shape) * compute for x in jax.tree.leaves(state.params))
    assert weights == (whole if weights_layout == "gathered" else 0)


def _axes(spec) -> set[str]:
    return {a for e in spec for a in ((e,) if isinstance(e, str) else e or ())}


def test_gathered_weights_keep_the_tensor_split():
    """With a tensor axis, the rollout's copy is gathered over data x fsdp only: a tensor-split leaf
    keeps its split, so a device holds its tensor share of the weights and nothing is fsdp-split."""
    mesh = sharding.make_mesh(1, 4, 2)
    model_config = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    model_def = ModelDef.create(model_config, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    pure = model_def.abstract_state.to_pure_dict()
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=s),
        pure,
        model_def.param_shardings(mesh),
    )
    engine = EmbeddedEngine(model_def, params, mesh, None, stop_token_ids=(0,), pad_token_id=0)
    gathered = engine.rollout_weights_sharding(params)
    tensor_split = 0
    for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(gathered)):
        assert not _axes(g.spec) & {"data", "fsdp"}, (p.sharding.spec, g.spec)
        assert ("tensor" in _axes(g.spec)) == ("tensor" in _axes(p.sharding.spec))
        tensor_split += "tensor" in _axes(g.spec)
    assert tensor_split, "no leaf is tensor-split: the check would be vacuous"
    whole = sum(math.prod(x.shape) * 2 for x in jax.tree.leaves(params))
    held = engine.rollout_weights_bytes_per_device(params)
    assert whole / 2 < held < whole


def _tpu_python():
    """A Python with libtpu (whose compiler builds TPU programs on this host): this one, or PR1_TPU_PYTHON."""
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    return os.environ.get("PR1_TPU_PYTHON")


_TPU_SCRIPT = """
import dataclasses, re, sys, tempfile
import jax.numpy as jnp
sys.path[:0] = ["configs", "tests"]
import debug as debug_config
from pr1.bench import memory
from pr1.models import attention as attention_lib
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.train import state as state_lib
from test_rollout_layout import computations, reachable, _WHILE
for layout in ("learner", "gathered"):
    with tempfile.TemporaryDirectory() as d:
        c = debug_config.get_config(d)
        c.data.prompts_per_step, c.rollout.n, c.rollout.max_new_tokens = 8, 2, 4
        c.data.max_prompt_length = 64
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 1
        c.rollout.weights_layout = layout
        mc = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
        mesh = memory.plan_mesh(c, memory.tpu_topology_devices("v5p:2x2x1"))
        mc = dataclasses.replace(mc, attention=attention_lib.resolve("auto", "tpu"))
        md = state_lib.ModelDef.create(mc, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
        state, _ = state_lib.abstract_train_state(md, state_lib.run_optimizer(c, md), mesh)
        hlo = memory.lower_rollout(c, md, mesh, state.params, mc)[0].compile().as_text()
        comps = computations(hlo)
        bodies = {m.group(1) for lines in comps.values() for line in lines for m in _WHILE.finditer(line)}
        in_loops = reachable(comps, bodies)
        moves = re.compile(r"\\b(all-gather|collective-permute)(-start)?\\(")
        inside = sum(bool(moves.search(line)) for name in in_loops for line in comps[name])
        print(f"{layout} {inside}")
"""


@pytest.mark.skipif(
    not _tpu_python(),
    reason="needs libtpu's compiler: pip install libtpu (the version jax[tpu] pins) here, or set "
    "PR1_TPU_PYTHON to a Python that has it",
)
def test_tpu_compiler_streams_learner_weights_in_the_loop_but_not_gathered_ones():
    """The reason for rollout.weights_layout: XLA's TPU compiler, unlike its CPU compiler, keeps the
    FSDP weight gathers inside the rollout's loops (as rings of collective-permutes), so with the
    learner's layout every decode step moves the weights again; the gathered layout moves none
    inside the loops. Tiny model, v5p:2x2x1 (4 chips, fsdp=4)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [_tpu_python(), "-c", _TPU_SCRIPT], capture_output=True, text=True, env=env, timeout=900, cwd=repo
    )
    assert out.returncode == 0, out.stderr[-3000:]
    inside = dict(
        line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["learner"], ["gathered"])
    )
    assert int(inside["learner"]) > 0, out.stdout
    assert int(inside["gathered"]) == 0, out.stdout
