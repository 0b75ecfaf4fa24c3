"""Memory planner: per-device bytes of the trainer's own jitted programs, compiled for abstract shapes.

    python -m pr1.bench.memory --config configs/perception_r1_qwen2_5_vl_7b.py \\
        --mesh data=1,fsdp=32,tensor=1 [--accelerator v5p] [--model_config PATH/config.json] \\
        [--config.learner.micro_batches=32 ...] [--phase update] [--tpu_topology v5p:2x4x4]

Where it sits: beside `pr1.train`, before a run is launched. It builds what `pr1.train.loop.train`
builds — the ModelDef, the optimizer and train state (`pr1.train.state.run_optimizer`,
`abstract_train_state`), the learner batch of
`pr1.train.batch.learner_batch`, the embedded engine's prompt batch — as `jax.ShapeDtypeStruct`s
with shardings (no weights are read, nothing is allocated), then lowers and compiles the three
programs of one training step on a fake CPU mesh of data x fsdp x tensor devices:

  rollout   the EmbeddedEngine's jitted prefill + decode of prompts_per_step prompts x n samples
  logprobs  make_logprob_step over the whole rollout batch (the old policy's logprobs)
  update    make_update_step over one mini-batch (micro-batched gradients, clipping, AdamW)

Per device it prints params, optimizer state, batch inputs and KV cache, computed exactly from the
sharded shapes, and XLA's `memory_analysis()` of each compiled program: arguments, outputs,
aliased (donated) bytes, temporaries (activations, gradients, attention scores...) and code.
Peak of a phase = the train state that is not an argument of the phase's program (the optimizer
state stays resident during rollout and logprobs) + arguments + outputs - aliased + temporaries +
code. The KV cache is created inside the rollout program, so XLA counts it among the rollout's
temporaries; it is shown as its own row, never added twice.

By default the temporaries come from XLA's CPU compiler (the CLI sets XLA_FLAGS / JAX_PLATFORMS
from --mesh before jax starts a backend, and picks the CPU's memory-minimizing scheduler). It keeps
bf16 elementwise work in fp32 and fuses differently from the TPU and GPU compilers, so its
temporaries overstate an accelerator's, the update's by far. With libtpu installed,
--tpu_topology compiles with the TPU compiler for a slice this host does not have; that compiler
refuses a program that does not fit its HBM, and the plan reports the temporaries it asked for.
docs/memory.md compares the two on the 7B recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax._src import xla_bridge
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from pr1 import sharding
from pr1.bench import accelerators
from pr1.models import attention as attention_lib
from pr1.models import config as model_config_lib
from pr1.models import vision as vision_lib
from pr1.models.config import Qwen25VLConfig
from pr1.rollout.sampler import EmbeddedEngine, bucket
from pr1.sharding import BATCH_AXES
from pr1.train import state as state_lib
from pr1.train import step as step_lib
from pr1.train.config import ConfigError, validate_config

MESH_AXES = ("data", "fsdp", "tensor")
PHASES = ("rollout", "logprobs", "update")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA's CPU compiler schedules for concurrency by default: it hoists independent work, such as every
# layer's rematerialized forward, to run early, which keeps all of it alive at once (remat=full then
# plans like remat=none). TPU and GPU schedule against a memory limit, as the CPU's
# memory-minimizing scheduler does, so that one is the better stand-in.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
# `--model_config` names that need no file: shapes of known checkpoints.
_BUILTIN_MODELS = {"qwen2_5_vl_7b": "qwen2_5_vl_7b_hf_config", "tiny": "tiny_hf_config"}


class PlanError(ValueError):
    """A plan that cannot be made as asked; the message says which flag or config key to change."""


# -- devices -------------------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=32,tensor=1' -> {'data': 1, 'fsdp': 32, 'tensor': 1}; an axis left out is 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise PlanError(
                f"--mesh {text!r}: each entry must be AXIS=N with AXIS in {MESH_AXES} and N >= 1 "
                f"(e.g. data=1,fsdp=32,tensor=1); got {part!r}"
            )
        sizes[name] = int(value)
    return sizes


def memory_scheduler_on() -> bool:
    """Whether XLA_FLAGS chose the CPU compiler's memory-minimizing scheduler (see _SCHEDULER_FLAG)."""
    return f"{_SCHEDULER_FLAG}=false" in os.environ.get("XLA_FLAGS", "")


def use_fake_cpu_devices(count: int) -> None:
    """Make jax see `count` CPU devices, scheduled to minimize memory; must run before anything
    initialises a jax backend.

    XLA reads the device count once, when the CPU backend starts, so a process whose backend is
    already up keeps its devices: that is an error if they are too few.
    """
    if xla_bridge.backends_are_initialized():
        have = jax.device_count()
        if have < count or jax.default_backend() != "cpu":
            raise PlanError(
                f"the mesh needs {count} fake CPU devices but jax was already initialised with {have} "
                f"{jax.default_backend()} device(s) in this process; run `python -m pr1.bench.memory` "
                "in a fresh process (it sets XLA_FLAGS and JAX_PLATFORMS itself)"
            )
        return
    xla_flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    xla_flags.append(f"{_DEVICE_FLAG}={count}")
    if not any(f.startswith(_SCHEDULER_FLAG) for f in xla_flags):
        xla_flags.append(f"{_SCHEDULER_FLAG}=false")
    os.environ["XLA_FLAGS"] = " ".join(xla_flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    # jax read JAX_PLATFORMS when it was imported; its config is what the backend start consults.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def tpu_topology_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. 'v5p:2x4x4' (v5p-64: 32 chips), for compiling without one:
    libtpu's compiler runs on this host (`pip install libtpu` at the version `jax[tpu]` pins)."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # no libtpu, or a name it does not know
        raise PlanError(
            f"--tpu_topology {topology}: cannot describe this TPU slice ({str(e).splitlines()[0]}); it "
            "needs libtpu installed (the version jax[tpu] pins) and a name like v5p:2x4x4, v5e:4x4 "
            "or v6e:4x4"
        ) from None


def plan_mesh(c: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
    """The config's data x fsdp x tensor mesh over `devices` (default: the first of jax's devices;
    tests plan sub-meshes of their 8)."""
    n = c.mesh.data * c.mesh.fsdp * c.mesh.tensor
    devices = list(jax.devices() if devices is None else devices)
    # A TPU slice's chips all take part; fake CPU devices can be more than the mesh uses.
    if n > len(devices) or (n != len(devices) and devices[0].platform != "cpu"):
        raise PlanError(
            f"mesh {dict(c.mesh)} needs {n} devices; {len(devices)} {devices[0].device_kind} "
            "devices are available"
        )
    return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices[:n])


# -- config --------------------------------------------------------------------------------------


def model_hf_config(c: ml_collections.ConfigDict, model_config: str | None = None) -> dict:
    """The config.json dict to plan for: `model_config` (a config.json, a checkpoint dir, or one of
    'qwen2_5_vl_7b' / 'tiny'), else model.path's config.json, else (debug configs) the tiny model."""
    if model_config in _BUILTIN_MODELS:
        return getattr(model_config_lib, _BUILTIN_MODELS[model_config])()
    if model_config:
        path = os.path.join(model_config, "config.json") if os.path.isdir(model_config) else model_config
        if not os.path.isfile(path):
            raise PlanError(
                f"--model_config {model_config}: no such file (give a config.json, a checkpoint dir, "
                f"or one of {sorted(_BUILTIN_MODELS)})"
            )
        with open(path) as f:
            return json.load(f)
    path = os.path.join(c.model.path, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if c.model.make_tiny_if_missing:
        return model_config_lib.tiny_hf_config()  # what pr1.models.tiny writes there on first use
    raise PlanError(
        f"model.path {c.model.path} has no config.json; pass --model_config PATH/config.json "
        f"(or --model_config=qwen2_5_vl_7b for Qwen2.5-VL-7B's shapes)"
    )


def prepare_config(c: ml_collections.ConfigDict, hf_config: dict, model_dir: str, mesh: dict[str, int]):
    """Point `c` at a dir holding only `hf_config` (no weights), set its mesh, and run the checks the
    trainer runs before it loads anything; returns the parsed `Qwen25VLConfig`."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(hf_config, f)
    c.model.path = model_dir
    c.model.make_tiny_if_missing = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (mesh[a] for a in MESH_AXES)
    # A plan needs shapes, not data: a recipe can be planned on a machine without its parquet files.
    # Includes the micro-batch rows over data x fsdp check, for this mesh's device count.
    validate_config(c, num_devices=math.prod(mesh.values()), check_files=False)
    if c.data.max_pixels is None:
        raise ConfigError(
            "data.max_pixels: unset; the planner sizes the image bucket from it (the trainer would "
            "use the processor's default): set --config.data.max_pixels"
        )
    return Qwen25VLConfig.from_dir(model_dir)


# -- abstract state and batches ------------------------------------------------------------------


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def image_patches(c: ml_collections.ConfigDict, model_config) -> int:
    """Patch slots per prompt at the static bucket the engine and learner pad to: one square image of
    at most data.max_pixels pixels (smart_resize keeps h*w <= max_pixels, sides multiples of
    patch_size x merge) in window-ordered slots (`vision.patch_slots`). Other aspect ratios can add
    a partial row or column of windows."""
    v = model_config.vision
    unit = v.patch_size * v.spatial_merge_size
    side = int(math.isqrt(int(c.data.max_pixels)) // unit) * v.spatial_merge_size
    return vision_lib.patch_bucket(
        vision_lib.patch_slots(np.array([[1, side, side]]), v), c.rollout.min_patch_bucket
    )


def pixel_dtype(c: ml_collections.ConfigDict):
    """Pixel values travel in the compute dtype (bf16 for the 7B recipe)."""
    return jnp.dtype(c.model.compute_dtype)


def prompt_bucket(c: ml_collections.ConfigDict) -> int:
    """The longest prompt's bucket (longer prompts are filtered by the dataset)."""
    return bucket(c.data.max_prompt_length, c.rollout.min_prompt_bucket)


def learner_batch_shapes(c: ml_collections.ConfigDict, model_config, rows: int, *, update: bool) -> dict:
    """The keys, shapes and dtypes `learner_batch` returns for `rows` responses at the longest prompt
    and image buckets, plus old_logprobs and advantages for the update (unsharded)."""
    length = prompt_bucket(c) + c.rollout.max_new_tokens
    patches = image_patches(c, model_config)
    f32, i32 = jnp.float32, jnp.int32
    shapes = {
        "input_ids": ((rows, length), i32),
        "attention_mask": ((rows, length), i32),
        "position_ids": ((rows, 3, length), i32),
        "loss_mask": ((rows, length), i32),
        "rollout_logprobs": ((rows, length), f32),
    }
    shapes.update(vision_lib.layout_shapes(rows, patches, model_config.vision))
    shapes["pixel_values"] = (shapes["pixel_values"][0], pixel_dtype(c))
    if update:
        shapes.update(old_logprobs=((rows, length), f32), advantages=((rows,), f32))
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def placed(shapes: dict, mesh: Mesh) -> dict:
    """`shapes` laid out as the learner steps take a batch (`pr1.sharding.batch_sharding`)."""
    step_lib.check_batch_rows({k: v.shape[0] for k, v in shapes.items()}, mesh)
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in shapes.items()}


def rollout_batch_shapes(c: ml_collections.ConfigDict, model_config, mesh: Mesh) -> dict:
    """The engine's prefill inputs (`EmbeddedEngine._prefill_inputs`) for prompts_per_step prompts,
    padded to a multiple of the batch devices (and of the prefill chunk), placed as the engine places them."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-c.data.prompts_per_step // batch_devices) * batch_devices
    chunk = -(-c.rollout.prefill_chunk // batch_devices) * batch_devices if c.rollout.prefill_chunk > 0 else 0
    if 0 < chunk < rows:
        rows = -(-rows // chunk) * chunk
    length, patches = prompt_bucket(c), image_patches(c, model_config)
    i32 = jnp.int32
    shapes = {
        "input_ids": ((rows, length), i32),
        "attention_mask": ((rows, length), i32),
        "position_ids": ((3, rows, length), i32),
        "deltas": ((rows,), i32),
    }
    shapes.update(vision_lib.layout_shapes(rows, patches, model_config.vision))
    shapes["pixel_values"] = (shapes["pixel_values"][0], pixel_dtype(c))
    out = {}
    for key, (shape, dtype) in shapes.items():
        axes = (None, BATCH_AXES) if key == "position_ids" else (BATCH_AXES,)
        out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*axes)))
    return out


def kv_cache_shapes(c: ml_collections.ConfigDict, model_config, mesh: Mesh, prompts: int) -> dict:
    """The rollout's KV caches (`pr1.models.decode`): the prompt cache k, v [layers, prompts, prompt
    bucket, kv_heads, head_dim], held once per prompt, and the response cache [layers, prompts*n,
    max_new_tokens, ...], in the compute dtype, sharded as `EmbeddedEngine._constrain_cache` shards them."""
    t = model_config.text
    heads = "tensor" if t.num_key_value_heads % mesh.shape["tensor"] == 0 else None
    sh = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None, heads, None))
    out = {}
    for name, rows, slots in (
        ("prompt", prompts, prompt_bucket(c)),
        ("response", prompts * c.rollout.n, c.rollout.max_new_tokens),
    ):
        shape = (t.num_hidden_layers, rows, slots, t.num_key_value_heads, t.head_dim)
        for k in ("k", "v"):
            out[f"{name}_{k}"] = jax.ShapeDtypeStruct(shape, jnp.dtype(c.model.compute_dtype), sharding=sh)
    return out


# -- the three programs --------------------------------------------------------------------------


def lower_update_step(c, model_def, tx, shardings, mesh: Mesh, state, model_config):
    """(lowered, batch): the learner update of one mini-batch, lowered for abstract `state`."""
    rows = c.data.prompts_per_step * c.rollout.n // c.train.mini_batches
    example = learner_batch_shapes(c, model_config, rows, update=True)
    batch = placed(example, mesh)
    update = step_lib.make_update_step(model_def, tx, c.learner, shardings, mesh)
    return update.lower(state, batch), batch


def steady_state(lowered, state):
    """The state the update returns, as the next call's input. With bf16 params optax's AdamW
    promotes its first moment to the fp32 of the accumulated gradients, so from the second update
    on the optimizer state (and the program) differ from the first call's; the steady state is the
    one to plan for. Returns (state, {path: (dtype before, dtype after)})."""
    out_state = lowered.out_info[0]
    changed = {}
    for (path, before), after in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(out_state)
    ):
        if before.dtype != after.dtype:
            changed[jax.tree_util.keystr(path)] = (str(before.dtype), str(after.dtype))
    new = jax.tree.map(
        lambda s, o: jax.ShapeDtypeStruct(s.shape, o.dtype, sharding=s.sharding), state, out_state
    )
    return new, changed


def lower_logprob_step(c, model_def, shardings, mesh: Mesh, params, model_config):
    """(lowered, batch): the old-policy logprob pass over the whole rollout batch."""
    rows = c.data.prompts_per_step * c.rollout.n
    example = learner_batch_shapes(c, model_config, rows, update=False)
    batch = placed(example, mesh)
    step = step_lib.make_logprob_step(model_def, c.learner, shardings.params, mesh)
    return step.lower(params, batch), batch


def lower_rollout(c, model_def, mesh: Mesh, params, model_config):
    """(lowered, batch): the embedded engine's jitted rollout for one step's prompts.

    The engine has no public way to lower its rollout for abstract params, so this builds one
    around the abstract params (the tokenizer is never used: nothing is decoded) and lowers its
    jitted `_rollout` with the arguments `generate` passes.
    """
    r = c.rollout
    # Token ids are values, not shapes: any id compiles the same program.
    engine = EmbeddedEngine(
        model_def,
        params,
        mesh,
        tokenizer=None,
        stop_token_ids=(0,),
        pad_token_id=0,
        min_prompt_bucket=r.min_prompt_bucket,
        min_patch_bucket=r.min_patch_bucket,
        prefill_chunk=r.prefill_chunk,
        weights_layout=r.weights_layout,
    )
    batch = rollout_batch_shapes(c, model_config, mesh)
    # generate() passes EOS and <|im_end|>: two stop ids.
    stop_ids = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    lowered = engine.lower(
        params,
        batch,
        stop_ids,
        n=r.n,
        max_new_tokens=r.max_new_tokens,
        greedy=r.temperature == 0,
        filtering=r.top_p < 1 or r.top_k > 0,
    )
    return lowered, batch, engine.rollout_weights_bytes_per_device(params)


# -- what the temporaries are -------------------------------------------------------------------

_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# Results that name an existing buffer (or live in the arguments) rather than allocate one.
_NOT_ALLOCATING = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _source_frames(hlo: str) -> Callable[[int], str]:
    """stack_frame_id -> 'file:line function < caller ...' over pr1's model/train files, from the
    FileNames / FunctionNames / FileLocations / StackFrames tables XLA prints with the module."""

    def table(name):
        m = re.search(rf"^{name}\n(.*?)(?:\n\n|\Z)", hlo, re.S | re.M)
        return [line.split(None, 1) for line in m.group(1).splitlines()] if m else []

    files = {int(i): v.strip('"') for i, v in table("FileNames")}
    functions = {int(i): v.strip('"') for i, v in table("FunctionNames")}
    locations, frames = {}, {}
    for i, v in table("FileLocations"):
        d = dict(re.findall(r"(\w+)=(\d+)", v))
        locations[int(i)] = (
            files.get(int(d["file_name_id"]), "?"),
            functions.get(int(d["function_name_id"]), "?"),
            d["line"],
        )
    for i, v in table("StackFrames"):
        d = dict(re.findall(r"(\w+)=(\d+)", v))
        # A frame's parent is printed as its id + 1 (0: none).
        frames[int(i)] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)

    def describe(frame: int) -> str:
        out = []
        while frame in frames and len(out) < 3:
            loc, parent = frames[frame]
            path, function, line = locations.get(loc, ("?", "?", "?"))
            if "/pr1/" in path and "/pr1/bench/" not in path:
                out.append(f"{path.split('/pr1/')[-1]}:{line} {function.split('.<locals>')[0]}")
            if parent == frame:
                break
            frame = parent
        return " < ".join(out)

    return describe


def largest_temporaries(hlo: str, k: int = 3) -> list[tuple[int, str, str]]:
    """The k largest arrays a compiled (per-device) program allocates: (bytes, 'f32[...]', source).

    A diagnostic, not part of the accounting: XLA reuses buffers, so these say what dominates the
    temporaries, not how they add up.
    """
    fused = set(re.findall(r"fusion\(.*calls=%([\w.-]+)", hlo))
    describe = _source_frames(hlo)
    found, computation = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m or computation in fused or m.group(3) in _NOT_ALLOCATING or m.group(1) not in _ITEMSIZE:
            continue
        dims = [int(d) for d in m.group(2).split(",") if d]
        size = math.prod(dims) * _ITEMSIZE[m.group(1)]
        shape = f"{m.group(1)}[{m.group(2)}]"
        frame = _FRAME.search(line)
        source = describe(int(frame.group(1))) if frame else ""
        if size > found.get(shape, (0, ""))[0]:
            found[shape] = (size, source)
    return sorted(((b, shape, src) for shape, (b, src) in found.items()), reverse=True)[:k]


# -- the plan ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PhaseMemory:
    """Per-device bytes of one phase: exact state/batch sizes and XLA's accounting of its program."""

    name: str
    shapes: str  # what was compiled, in words
    params: int
    optimizer: int
    batch: int
    kv_cache: int  # part of `temp` (created inside the program)
    rollout_weights: int  # part of `temp`: the rollout's gathered compute-dtype weights (weights_layout)
    resident: int  # train state that is not an argument of the program
    arguments: int
    outputs: int
    aliased: int
    temp: int
    code: int
    compile_s: float
    largest: list = dataclasses.field(default_factory=list)  # largest_temporaries()
    refused: str = ""  # the compiler's out-of-memory message, when it would not compile

    @property
    def peak(self) -> int:
        return self.resident + self.arguments + self.outputs - self.aliased + self.temp + self.code


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict
    devices: int
    param_count: int
    phases: list[PhaseMemory]
    notes: list[str]

    def phase(self, name: str) -> PhaseMemory:
        return next(p for p in self.phases if p.name == name)


# libtpu will not compile a program whose temporaries exceed the chip's HBM; its error says how much
# they need (e.g. "... required for HLO temporaries (160.58G) exceeds available HBM (95.74G)").
_OUT_OF_MEMORY = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _compiled_memory(lowered, argument_bytes: int) -> dict:
    """XLA's memory analysis of `lowered`, compiled; for a program the compiler refuses for lack of
    memory, the temporaries its error names and the exact `argument_bytes` (outputs unknown: 0)."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        m = _OUT_OF_MEMORY.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        temp = int(float(m.group(1)) * 1024 ** (" KMGT".index(m.group(2) or " ")))
        return {
            "arguments": argument_bytes,
            "outputs": 0,
            "aliased": 0,
            "temp": temp,
            "code": 0,
            "compile_s": time.perf_counter() - t0,
            "refused": str(e).splitlines()[0],
        }
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if m is None:
        raise PlanError(f"XLA's {jax.default_backend()} compiler gives no memory analysis for this program")
    try:
        largest = largest_temporaries(compiled.as_text())
    except jax.errors.JaxRuntimeError:  # a libtpu whose HLO protos this jaxlib cannot print back
        largest = []
    return {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
        "compile_s": seconds,
        "largest": largest,
    }


def plan_memory(
    c: ml_collections.ConfigDict,
    model_config,
    mesh: Mesh,
    *,
    phases: Sequence[str] = PHASES,
    log: Callable[[str], None] = lambda s: None,
) -> MemoryPlan:
    """Lower and compile `phases` of one training step of config `c` on `mesh`; per-device bytes."""
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise PlanError(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    r, lc = c.rollout, c.learner
    notes = []
    if "rollout" in phases and r.engine != "embedded":
        notes.append(
            f"rollout.engine={r.engine}: rollouts run on the {r.engine} servers, not on this mesh; "
            "not planned"
        )
        phases = [p for p in phases if p != "rollout"]
    if mesh.devices.flat[0].platform == "cpu" and not memory_scheduler_on():
        notes.append(
            f"XLA_FLAGS lacks {_SCHEDULER_FLAG}=false (the CLI sets it): the CPU compiler's concurrency "
            "scheduler overstates the temporaries and hides what remat saves"
        )
    # The attention the target runs ('auto': splash on a TPU topology, blockwise on the CPU compiler).
    platform = mesh.devices.flat[0].platform
    model_config = dataclasses.replace(
        model_config, attention=attention_lib.resolve(c.model.attention, platform)
    )
    notes.append(f"model.attention={c.model.attention}: {model_config.attention} on {platform}")
    model_def = state_lib.ModelDef.create(
        model_config, dtype=jnp.dtype(c.model.param_dtype), compute_dtype=jnp.dtype(c.model.compute_dtype)
    )
    # The run's train state, built as pr1.train.loop.init_run builds it (shapes only).
    tx = state_lib.run_optimizer(c, model_def)
    state, shardings = state_lib.abstract_train_state(model_def, tx, mesh)
    length = prompt_bucket(c) + r.max_new_tokens
    mini_rows = c.data.prompts_per_step * r.n // c.train.mini_batches

    # The update is lowered first: its output decides the optimizer state every phase carries.
    update_shapes = (
        f"{mini_rows} responses of {length} tokens in "
        f"{step_lib.micro_batch_count(lc, mini_rows, mesh)} micro-batches"
    )
    log(f"lowering update ({update_shapes}, remat={lc.remat}, logprob_chunk={lc.logprob_chunk})")
    update = lower_update_step(c, model_def, tx, shardings, mesh, state, model_config)
    state, changed = steady_state(update[0], state)
    if changed:
        moves = sorted(set(changed.values()))
        notes.append(
            f"the first update changes the dtype of {len(changed)} optimizer-state leaves ("
            + ", ".join(f"{a} -> {b}" for a, b in moves)
            + "): AdamW's first moment takes the dtype of the "
            "fp32 accumulated gradients; planned for the state of every later step"
        )
        update = lower_update_step(c, model_def, tx, shardings, mesh, state, model_config)
    params_b, opt_b = bytes_per_device(state.params), bytes_per_device(state.opt_state)
    # Phases that take only the params leave the optimizer state (and step) resident beside them.
    resident = opt_b + bytes_per_device(state.step)

    out = []
    for name in (p for p in PHASES if p in phases):
        t0, kv, weights = time.perf_counter(), 0, 0
        if name == "update":
            (lowered, batch), shapes, outside = update, update_shapes, 0
        elif name == "logprobs":
            rows = c.data.prompts_per_step * r.n
            micro = step_lib.micro_batch_count(lc, rows, mesh)
            shapes = f"{rows} responses of {length} tokens in {micro} micro-batches"
            log(f"lowering logprobs ({shapes})")
            lowered, batch = lower_logprob_step(c, model_def, shardings, mesh, state.params, model_config)
            outside = resident
        else:
            log(
                f"lowering rollout ({c.data.prompts_per_step} prompts x n={r.n}, "
                f"prompt bucket {prompt_bucket(c)}, "
                f"{r.max_new_tokens} new tokens, {image_patches(c, model_config)} image patches per prompt)"
            )
            lowered, batch, weights = lower_rollout(c, model_def, mesh, state.params, model_config)
            prompts = batch["input_ids"].shape[0]
            kv = bytes_per_device(kv_cache_shapes(c, model_config, mesh, prompts))
            shapes = (
                f"{prompts} prompts x n={r.n} = {prompts * r.n} sequences, "
                f"{prompt_bucket(c)} prompt KV slots (once per prompt) + {r.max_new_tokens} response slots, "
                f"prefill chunk {r.prefill_chunk or prompts}"
            )
            outside = resident
        log(f"compiling {name} ...")
        args = (
            bytes_per_device(batch)
            + params_b
            + (opt_b + bytes_per_device(state.step) if name == "update" else 0)
        )
        stats = _compiled_memory(lowered, args)
        log(
            f"  {name}: "
            + (
                "the compiler refused it: out of memory"
                if stats.get("refused")
                else f"compiled in {stats['compile_s']:.0f} s, lowered in "
                f"{time.perf_counter() - t0 - stats['compile_s']:.0f} s"
            )
        )
        out.append(
            PhaseMemory(
                name=name,
                shapes=shapes,
                params=params_b,
                optimizer=opt_b,
                batch=bytes_per_device(batch),
                kv_cache=kv,
                rollout_weights=weights,
                resident=outside,
                **stats,
            )
        )
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    return MemoryPlan(mesh=dict(mesh.shape), devices=mesh.size, param_count=n_params, phases=out, notes=notes)


def format_plan(plan: MemoryPlan, accelerator_names: Sequence[str], title: str = "") -> str:
    fb = accelerators.format_bytes
    cols = plan.phases
    width = 14

    def head(label):
        return f"  {label:<36}"

    lines = [
        f"{title}mesh {' x '.join(f'{k}={v}' for k, v in plan.mesh.items())} ({plan.devices} devices), "
        f"{plan.param_count:,} parameters; bytes per device",
        "",
    ]
    lines.append(head("") + "".join(f"{p.name:>{width}}" for p in cols))
    rows = [
        ("params", "params"),
        ("optimizer state (AdamW moments)", "optimizer"),
        ("batch inputs", "batch"),
        ("KV cache (inside XLA temp)", "kv_cache"),
        ("rollout weights (inside XLA temp)", "rollout_weights"),
        ("XLA arguments", "arguments"),
        ("XLA outputs", "outputs"),
        ("XLA aliased (donated state)", "aliased"),
        ("XLA temp (activations, grads...)", "temp"),
        ("XLA generated code", "code"),
        ("resident state outside the program", "resident"),
        ("peak estimate", "peak"),
    ]
    for label, attr in rows:
        lines.append(head(label) + "".join(f"{fb(getattr(p, attr)):>{width}}" for p in cols))
    lines.append("")
    for p in cols:
        if p.refused:
            lines.append(f"  {p.name}: {p.shapes}; the compiler refused it: {p.refused}")
            continue
        lines.append(f"  {p.name}: {p.shapes}; compiled in {p.compile_s:.0f} s; largest arrays:")
        for size, shape, source in p.largest:
            lines.append(f"    {fb(size):>9}  {shape}  {source or '(no source location)'}")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    lines.append("")
    for name in accelerator_names:
        verdicts = [(p.name, accelerators.verdict(p.peak, name)) for p in cols]
        overall = "fits" if all(v.fits for _, v in verdicts) else "does not fit"
        lines.append(
            f"  {name:<5} {accelerators.format_bytes(accelerators.hbm_bytes(name)):>9}: {overall:<12} | "
            + " | ".join(f"{n} {v}" for n, v in verdicts)
        )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> dict:
    """The CLI's flags, defined only when run as a program (`pr1.train` defines --config in absl's
    global registry too)."""
    f = dict(
        config=config_flags.DEFINE_config_file(
            "config", None, "path to a configs/*.py file", lock_config=True, flag_values=fv
        ),
        mesh=flags.DEFINE_string(
            "mesh",
            None,
            "device mesh to plan for, e.g. data=1,fsdp=32,tensor=1 (fake CPU "
            "devices; XLA_FLAGS and JAX_PLATFORMS are set from it)",
            flag_values=fv,
        ),
        accelerator=flags.DEFINE_enum(
            "accelerator",
            None,
            list(accelerators.HBM_GIB),
            "judge the fit against this accelerator's HBM (default: all of them)",
            flag_values=fv,
        ),
        model_config=flags.DEFINE_string(
            "model_config",
            None,
            "config.json or checkpoint dir to plan for, or "
            f"{' / '.join(_BUILTIN_MODELS)} (default: model.path's config.json)",
            flag_values=fv,
        ),
        phase=flags.DEFINE_multi_enum(
            "phase", list(PHASES), list(PHASES), "phases to compile (repeatable)", flag_values=fv
        ),
        tpu_topology=flags.DEFINE_string(
            "tpu_topology",
            None,
            "compile with libtpu's compiler for this TPU slice "
            "(e.g. v5p:2x4x4) instead of for fake CPU devices",
            flag_values=fv,
        ),
    )
    flags.mark_flags_as_required(["config", "mesh"], flag_values=fv)
    return f


def main(argv, f: dict) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def say(s):
        print(f"pr1.bench.memory: {s}", flush=True)

    try:
        mesh_sizes = parse_mesh(f["mesh"].value)
        use_fake_cpu_devices(math.prod(mesh_sizes.values()))
        c = f["config"].value
        with tempfile.TemporaryDirectory(prefix="pr1-memory-") as model_dir:
            model_config = prepare_config(
                c, model_hf_config(c, f["model_config"].value), model_dir, mesh_sizes
            )
            topology = f["tpu_topology"].value
            mesh = plan_mesh(c, tpu_topology_devices(topology) if topology else None)
            say(
                f"compiling for {mesh.size} {mesh.devices.flat[0].device_kind} devices"
                + (f" (TPU slice {topology})" if topology else " (fake, XLA's CPU compiler)")
            )
            t0 = time.perf_counter()
            plan = plan_memory(c, model_config, mesh, phases=f["phase"].value, log=say)
            say(f"done in {time.perf_counter() - t0:.0f} s")
    except ConfigError as e:
        print(f"pr1.bench.memory: bad config: {e}", file=sys.stderr)
        return 2
    except (PlanError, sharding.ShardingError) as e:
        print(f"pr1.bench.memory: {e}", file=sys.stderr)
        return 2
    kind = accelerators.TPU_DEVICE_KINDS.get(mesh.devices.flat[0].device_kind)
    names = [f["accelerator"].value or kind] if f["accelerator"].value or kind else list(accelerators.HBM_GIB)
    title = config_flags.get_config_filename(flags.FLAGS["config"])
    print()
    print(format_plan(plan, names, title=f"{title}: "))
    return 0


def _parse_flags(argv):
    """absl's parsing with pr1.train's error for `--config.no.such.key=...` (a line, not a traceback)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # what ml_collections raises for a missing key / section
        detail = str(e).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
        key = re.search(r"\w+", detail).group(0) if re.search(r"\w+", detail) else ""
        culprit = next(
            (
                a.split("=")[0]
                for a in argv[1:]
                if a.startswith("--config.") and key in a.split("=")[0].split(".")
            ),
            "--config.*",
        )
        print(
            f"pr1.bench.memory: bad config override {culprit}: the config has no key {detail}",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    app.run(functools.partial(main, f=define_flags()), flags_parser=_parse_flags)
