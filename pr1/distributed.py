"""Multi-process (multi-host) runs: start-up, and the few cross-process steps the trainer needs.

Where it sits: `python -m pr1.train` calls `maybe_initialize` before JAX touches a device; with
`PR1_DISTRIBUTED=1` (or config `distributed.enabled`) every process joins one JAX cluster and
`jax.devices()` lists the devices of all of them. On a TPU pod a bare `jax.distributed.initialize()`
detects coordinator, process count and id; elsewhere they come from config `distributed.*` or the
environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

The data layout every multi-process step relies on: process p owns global batch rows
[p·L, (p+1)·L) (its L local rows: its prompts, all n responses of each), and its devices hold exactly
those rows of any array sharded over the batch axes (`check_process_rows`). Host-side work (data,
rewards, advantages) stays on the process that owns the rows; jitted steps see global arrays built
from local rows (`global_array_from_local`), and their results come back per process from the
addressable shards only (`local_rows`). Static shapes must be agreed by every process
(`max_over_processes`), or each would compile a different program and the collectives would hang.

`allgather_host`, `allgather_object`, the `*_over_processes` reductions and `barrier` are
collectives when there are several processes: every process must call each, in the same order.
With one process they return their input (and `global_array_from_local` is a `device_put`), so a
single-process run executes exactly what it did before multi-process support existed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import Sequence

import jax
import ml_collections
import numpy as np

ENV_FLAG = "PR1_DISTRIBUTED"
# Read here because jax.distributed.initialize only reads JAX_COORDINATOR_ADDRESS itself.
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def distributed_config() -> ml_collections.ConfigDict:
    """The `distributed` section of a training config. None: from the environment or auto-detected."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        dict(
            enabled=False,  # or env PR1_DISTRIBUTED=1
            coordinator_address=placeholder(str),  # "host:port" of process 0
            num_processes=placeholder(int),
            process_id=placeholder(int),
            initialization_timeout=300,  # s to wait for every process to join
            # s without a heartbeat before the coordinator declares a process dead and stops the others
            # (instead of leaving them blocked in a collective).
            heartbeat_timeout=100,
        )
    )


def enabled(config: ml_collections.ConfigDict | None = None) -> bool:
    """True when this run should join a multi-process JAX cluster (env flag or config key)."""
    if os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes"):
        return True
    section = config.get("distributed") if config is not None else None
    return bool(section is not None and section.get("enabled"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def maybe_initialize(config: ml_collections.ConfigDict | None = None) -> bool:
    """Joins the JAX cluster when `enabled(config)`; returns whether this run is distributed.

    Must run before anything asks JAX for its devices. Calling it again (e.g. `train()` after the
    CLI did) is a no-op.
    """
    if not enabled(config):
        return False
    if jax.distributed.is_initialized():
        return True
    section = (config.get("distributed") if config is not None else None) or distributed_config()
    num_processes = section.get("num_processes")
    process_id = section.get("process_id")
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else int(num_processes)
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else int(process_id)
    # Processes on CPU exchange data through gloo over TCP (JAX 0.10's default, pinned here because
    # without a cross-process implementation a CPU computation over several processes fails).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=section.get("coordinator_address"),
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(section.get("initialization_timeout", 300)),
            heartbeat_timeout_seconds=int(section.get("heartbeat_timeout", 100)),
        )
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({e}). It must run before any JAX computation; on a pod "
            f"run the same command on every worker, elsewhere set config distributed.coordinator_address/"
            f"num_processes/process_id (or {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}, JAX_COORDINATOR_ADDRESS)"
        ) from e
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def abort(code: int = 1) -> None:
    """Ends this process now, skipping JAX's shutdown barrier, which would wait (minutes) for peers
    that are blocked in a collective this process will never join. The coordinator notices the
    missing heartbeats within `distributed.heartbeat_timeout` and stops the other processes."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def abort_peers_on_error():
    """With several processes, an exception here prints its traceback and `abort`s the process
    (single process: the exception propagates as usual)."""
    try:
        yield
    except BaseException:
        if not (jax.distributed.is_initialized() and is_multiprocess()):
            raise
        print(
            f"pr1: process {jax.process_index()} of {jax.process_count()} failed; stopping it so the "
            "others stop too:",
            file=sys.stderr,
        )
        traceback.print_exc()
        abort(1)


# ---- host values across processes ----------------------------------------------------------------


def _stack(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's `x` (all of the same shape and dtype)."""
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    if x.size == 0:
        return np.zeros((jax.process_count(),) + x.shape, x.dtype)
    # As raw bytes: JAX without x64 would turn float64/int64 into 32 bits, and bool collectives are
    # not supported everywhere.
    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    every = np.ascontiguousarray(multihost_utils.process_allgather(raw))
    return every.view(x.dtype).reshape((every.shape[0],) + x.shape)


def allgather_host(x, *, same_shape: bool = False) -> np.ndarray:
    """Every process's rows of `x`, concatenated along axis 0 in process order, on every process.

    Processes may hold different numbers of rows (validation); the other dimensions must agree.
    `same_shape=True` promises equal shapes everywhere and saves the collective that agrees on them.
    """
    x = np.asarray(x)
    if not is_multiprocess():
        return x
    x = x.reshape(x.shape if x.ndim else (1,))
    if same_shape:
        return np.concatenate(list(_stack(x)))
    shapes = _stack(np.asarray((x.ndim,) + x.shape, np.int64)) if x.ndim < 8 else None
    if (
        shapes is None
        or len({tuple(s) for s in shapes[:, 2:].tolist()}) > 1
        or len(set(shapes[:, 0].tolist())) > 1
    ):
        raise ValueError(
            f"allgather_host: processes disagree on the trailing shape of {x.shape} (or ndim >= 8)"
        )
    rows = shapes[:, 1]
    padded = np.zeros((int(rows.max()),) + x.shape[1:], x.dtype)
    padded[: x.shape[0]] = x
    every = _stack(padded)
    return np.concatenate([every[p, : rows[p]] for p in range(len(rows))])


def allgather_object(obj) -> list:
    """Every process's JSON-serializable `obj`, as a list in process order, on every process."""
    if not is_multiprocess():
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = _stack(np.array(data.size, np.int64))
    every = _stack(np.pad(data, (0, int(lengths.max()) - data.size)))
    return [json.loads(every[p, : lengths[p]].tobytes()) for p in range(len(lengths))]


def max_over_processes(values: Sequence[int]) -> tuple[int, ...]:
    """The element-wise maximum of integer `values` over all processes (static shapes to agree on)."""
    values = tuple(int(v) for v in values)
    if not is_multiprocess():
        return values
    return tuple(int(v) for v in _stack(np.asarray(values, np.int64)).max(axis=0))


def sum_over_processes(values: Sequence[float]) -> tuple[float, ...]:
    """The element-wise sum of `values` over all processes (counts: exact for integers < 2**53)."""
    values = tuple(float(v) for v in values)
    if not is_multiprocess():
        return values
    return tuple(float(v) for v in _stack(np.asarray(values, np.float64)).sum(axis=0))


def any_over_processes(flag: bool) -> bool:
    """True on every process when `flag` is True on any (e.g. a stop signal that reached one host)."""
    return bool(max_over_processes([int(bool(flag))])[0])


def barrier(name: str) -> None:
    """Waits until every process got here (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---- device arrays from and to process-local rows -------------------------------------------------


def global_array_from_local(local: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array whose batch rows on this process's devices are `local`.

    Single process: `device_put`. Several: `jax.make_array_from_process_local_data`, which infers
    the global shape from the sharding (L local rows → L·process_count rows for a batch-sharded
    axis) and expects identical data on processes that are replicas of each other.
    """
    if not is_multiprocess():
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(x: jax.Array, start: int, stop: int, axis: int = 0) -> np.ndarray:
    """Rows [start, stop) along `axis` of a global array, read from this process's addressable shards.

    Works for any layout of `axis` (sharded or replicated) as long as this process's devices hold
    those rows whole; raises naming the rows it could not find otherwise.
    """
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x)).take(range(start, stop), axis=axis)
    shape = list(x.shape)
    shape[axis] = stop - start
    out = np.empty(shape, x.dtype)
    seen = np.zeros(stop - start, bool)
    for shard in x.addressable_shards:
        index = shard.index
        if any(index[d].indices(n) != (0, n, 1) for d, n in enumerate(x.shape) if d != axis):
            raise ValueError(
                f"local_rows: array of shape {x.shape} is sharded along an axis other than {axis} "
                f"({x.sharding}); gather it first"
            )
        lo, hi, _ = index[axis].indices(x.shape[axis])
        a, b = max(lo, start), min(hi, stop)
        if a >= b or seen[a - start : b - start].all():
            continue
        data = np.asarray(shard.data)
        take = [slice(None)] * x.ndim
        take[axis] = slice(a - lo, b - lo)
        put = [slice(None)] * x.ndim
        put[axis] = slice(a - start, b - start)
        out[tuple(put)] = data[tuple(take)]
        seen[a - start : b - start] = True
    if not seen.all():
        missing = np.flatnonzero(~seen) + start
        raise ValueError(
            f"local_rows: rows {missing[:8].tolist()}... of an array of shape {x.shape} are not on "
            f"process {jax.process_index()}'s devices ({x.sharding})"
        )
    return out


def process_row_blocks(mesh: jax.sharding.Mesh, axes: Sequence[str]) -> list[tuple[int, int]]:
    """For a batch of one row per device along `axes`, the [start, stop) rows each process holds."""
    rows = int(np.prod([mesh.shape[a] for a in axes]))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(axes)))
    held: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((rows,)).items():
        held.setdefault(device.process_index, set()).update(range(*index[0].indices(rows)))
    blocks = []
    for p in range(jax.process_count()):
        r = sorted(held.get(p, ()))
        blocks.append((r[0], r[-1] + 1) if r and r == list(range(r[0], r[-1] + 1)) else (-1, -1))
    return blocks


def check_process_rows(mesh: jax.sharding.Mesh, axes: Sequence[str]) -> None:
    """Raises ValueError unless process p's devices hold the p-th equal block of the batch axes.

    That layout is what lets each process feed only its own prompts: with it, a process's local rows
    are one contiguous block of the global batch, in process order (so a k-process run computes on
    the same global batch as a one-process run). It fails when a mesh axis outside the batch axes
    (e.g. `tensor`) spans several processes, or when the devices are not in process order.
    """
    blocks = process_row_blocks(mesh, axes)
    size = blocks[0][1] - blocks[0][0]
    expected = [(p * size, (p + 1) * size) for p in range(len(blocks))]
    if size <= 0 or blocks != expected:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: the batch axes {tuple(axes)} give the {len(blocks)} processes "
            f"rows {blocks} "
            f"(of one row per device); every process must hold its own equal block, in process order. Keep "
            f"config mesh.tensor within one host's devices, and build the mesh from jax.devices() in order"
        )
