"""Checkpoints of the train state and the host state, with auto-resume (a thin layer over orbax).

Where it sits: the run loop calls `save` at the end of a step (the device state is copied off the
accelerator before `save` returns, so the next jitted step may donate its buffers) and, at start-up,
`restore` into the born-sharded abstract state to resume. It knows nothing about the model: the
device state is any pytree of jax arrays, possibly sharded over a multi-host mesh, and the host
state is a small JSON dict (data-iterator state, rng seeds, counters). The one thing it knows of the
model is the record the trainer stores under host_state["model"] (`model_record`: the HF config and
the source path), so export and evaluation can rebuild the model from a checkpoint alone.

Layout and completeness: each step is a directory `<directory>/<step>/` holding `state/` (orbax
StandardSave, one tensorstore array per leaf) and `host_state/` (JSON, written by process 0 only).
Orbax writes a step under `<step>.orbax-checkpoint-tmp` and renames it when every host is done;
on gs://, where a rename is not atomic, it instead writes `commit_success.txt` last. Anything
without that mark is an interrupted save: it is never listed or restored, and the leftovers are
deleted when a new Checkpointer opens the directory.

Secrets never go into a checkpoint: host_state must not hold API keys or tokens (they come from
the environment), and keys that look like one are refused before anything is written.

A save that fails (disk full, a directory that became unwritable, a bucket error) is reported as
`CheckpointSaveError` naming the step's path, when it fails or, for the background write, at the
next call that joins it (`save`, `all_steps`, `wait`, `close`); the uncommitted step is never listed,
so the newest complete checkpoint still restores.

Every process must call `save`, `restore`, `wait` and `close` (orbax synchronises the hosts).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_STATE = "state"
_HOST_STATE = "host_state"
# Where the trainer keeps its checkpoints inside a workdir (the export CLI and resume look here).
CHECKPOINT_SUBDIR = "checkpoints"
# A credential-looking key: api keys, secrets, passwords, and keys that *end* in "token" (auth_token,
# AccessToken), but not counters such as num_tokens or tokens_seen, nor tokenizer_path.
_SECRET_KEY = re.compile(r"api_?key|secret|passw(or)?d|token$")
# The host-state key of the model record (`model_record`).
MODEL_RECORD_KEY = "model"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names the step's path and the newest complete
    checkpoint, from which a resume continues."""


def checkpoint_directory(workdir: str) -> str:
    """The checkpoint directory of a training workdir (local path or gs:// URL)."""
    return f"{str(workdir).rstrip('/')}/{CHECKPOINT_SUBDIR}"


def model_record(config, source_path: str | None) -> dict:
    """What the trainer stores in host_state[MODEL_RECORD_KEY] so a checkpoint can be exported or
    evaluated on its own: the model's HF config dict (`config.hf_config`) and where it came from."""
    return {"hf_config": config.hf_config, "path": None if source_path is None else os.fspath(source_path)}


def recorded_model(host_state: dict, where: str) -> dict:
    """The model record a pr1 checkpoint's host state carries (see `model_record`).

    Raises ValueError naming `where` (the step's path) if the record is absent or malformed.
    """
    record = host_state.get(MODEL_RECORD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("hf_config"), dict):
        raise ValueError(
            f"checkpoint {where} has no host_state['{MODEL_RECORD_KEY}']['hf_config'] (the model config "
            f"the trainer records); it was not written by pr1.train"
        )
    return record


def abstract_like(state):
    """The ShapeDtypeStruct pytree of a concrete state, shardings included (a `restore` target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
    )


class Checkpointer:
    """Keeps the newest `keep` complete checkpoints of (state, host_state) under `directory`.

    `directory` is a local path or a gs:// URL. `keep=None` keeps every checkpoint. `save` writes
    only every `save_interval_steps` steps unless `force=True` (the final step, a pre-emption).
    """

    def __init__(
        self, directory: str, *, keep: int | None = 3, async_save: bool = True, save_interval_steps: int = 1
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"Checkpointer keep must be >= 1 or None (keep all), got {keep} for {directory}")
        if save_interval_steps < 1:
            raise ValueError(f"Checkpointer save_interval_steps must be >= 1, got {save_interval_steps}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # orbax's default also saves whatever step comes first in an empty directory; here a
            # step is saved on the interval, at a pre-emption sync point (multi-host runs), or when
            # forced, so `save`'s answer depends only on the step.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                [
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            enable_async_checkpointing=async_save,
            # Interrupted saves are garbage: without this a pod that is pre-empted mid-save a few
            # times leaves full-size orphan copies of the state in the bucket.
            cleanup_tmp_directories=True,
            create=True,
        )
        # etils epath rather than os.path: the same code reads and writes gs:// buckets.
        path = epath.Path(directory)
        if "://" not in str(directory):
            # tensorstore refuses relative paths, and would do so only inside the background write.
            path = path.resolve()
        self._label = str(path)  # what errors name: where it actually looked
        self._manager = ocp.CheckpointManager(path, options=options)
        # Steps that were complete when the save now in flight started. orbax lists a step as soon
        # as its save is launched (and drops steps it is about to delete), but until the commit a
        # crash would lose it, so while a save is in flight this is the truthful answer.
        self._complete_before_pending: list[int] | None = None
        self.upcast: list[str] = []  # arrays the last restore widened from their saved dtype
        self._pending_step: int | None = None  # the step of the save in flight (or that failed)
        self._reported: CheckpointSaveError | None = None

    @property
    def directory(self) -> str:
        return self._label

    def save(self, step: int, state, host_state: dict | None = None, *, force: bool = False) -> bool:
        """Starts writing `step`; returns False if the save interval (or an existing step) skips it.

        The device arrays are copied to host memory before this returns; the write and the commit
        run in the background when async. Raises ValueError for a host_state that is not plain
        JSON or that holds a secret-looking key, before anything is written.
        """
        host_state = {} if host_state is None else host_state
        _check_host_state(host_state, self._label)
        # A deep copy: the JSON is written in the background, and the loop keeps mutating its
        # counters and iterator state while it is.
        host_copy = json.loads(json.dumps(host_state))
        self._join()  # the previous save: a failure there is that step's, reported as such
        before = sorted(self._manager.all_steps())
        self._pending_step = step
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardSave(state),
                        _HOST_STATE: ocp.args.JsonSave(host_copy),
                    }
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - whatever the filesystem or orbax raised
            self._complete_before_pending = before
            raise self._save_failed(e) from e
        if saved:
            # The previous save was joined above, so every step in `before` is committed.
            self._complete_before_pending = before
        else:
            self._pending_step = None
        return saved

    def _join(self) -> None:
        """Waits for the save in flight; a failure becomes CheckpointSaveError naming its step."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - raised by the background write
            raise self._save_failed(e) from e
        self._pending_step = None

    def _save_failed(self, error: Exception) -> CheckpointSaveError:
        # Reported once: the run stops on it, and closing the checkpointer then must not raise
        # the same failure again over it.
        if self._reported:
            return self._reported
        step = self._pending_step
        complete = self._complete_before_pending
        if complete is None:
            complete = sorted(self._manager.all_steps())
        complete = [s for s in complete if s != step]
        newest = f"step {complete[-1]}" if complete else "none"
        where = f"{self._label}/{step}" if step is not None else self._label
        self._reported = CheckpointSaveError(
            f"checkpoint save of step {step} to {where} failed: {type(error).__name__}: {error}. The newest "
            f"complete checkpoint in {self._label} is {newest}; a resume continues from it"
        )
        return self._reported

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (a save in flight is not one yet)."""
        if self._complete_before_pending is not None:
            if self._manager.is_saving_in_progress():
                return list(self._complete_before_pending)
            # Finished: join it, which raises here if the background write failed instead of
            # listing a step that is not on disk.
            self._join()
            self._complete_before_pending = None
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """(state, host_state) of `step` (default: the newest), arrays laid out as `abstract_state`.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct, each with a sharding (see
        `abstract_like`, or `jax.eval_shape` plus the shardings of the current mesh); the arrays
        are read straight into those shardings, which may differ from the ones they were saved
        with. Waits for a save in flight first: its commit may delete the step being read.

        Dtypes: each array is read in the dtype it was saved in. Where that differs from
        `abstract_state`'s, a widening float cast (an old checkpoint's bf16 params or moments into
        an fp32 run) is made after the read and listed in `self.upcast` (the caller says so in a
        log line); anything else (fp32 into bf16, float into int) would lose what was saved and
        raises ValueError naming the array and both dtypes. Never a silent truncation.
        """
        _check_abstract_state(abstract_state, self._label)
        self.wait()
        step = _pick_step(self.all_steps(), step, self._label)
        stored = self._stored_dtypes(step)
        target, self.upcast = _target_in_stored_dtypes(abstract_state, stored, f"{self._label}/{step}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(target),
                    _HOST_STATE: ocp.args.JsonRestore(),
                }
            ),
        )
        state = restored[_STATE]
        if self.upcast:
            state = jax.tree.map(
                lambda x, a: x if x.dtype == a.dtype else jax.device_put(x.astype(a.dtype), a.sharding),
                state,
                abstract_state,
            )
        return state, dict(restored[_HOST_STATE] or {})

    def _stored_dtypes(self, step: int) -> dict:
        """{path: dtype} of the arrays saved at `step`, from orbax's metadata (no array is read)."""
        return _stored_dtypes(self._label, step)

    def wait(self) -> None:
        """Blocks until every save started so far is committed; raises CheckpointSaveError if one failed."""
        self._join()
        self._complete_before_pending = None

    def close(self) -> None:
        """Waits for pending saves (and deletions of old steps), then releases orbax's threads; raises
        CheckpointSaveError (after releasing them) if a save failed that was not reported yet."""
        already = self._reported is not None
        error = None
        try:
            self._join()
        except CheckpointSaveError as e:
            error = e
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001 - orbax re-raising the background write's failure
            error = error or self._save_failed(e)
        self._complete_before_pending = None
        if error is not None and not already:
            raise error

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_params(directory: str, step: int | None = None, sharding=None) -> tuple[Any, dict, int]:
    """(params, host_state, step) of a checkpoint, reading only the `params` subtree of the state.

    For export and evaluation: the optimizer moments (twice the size of the params under AdamW)
    are never read. Without `sharding` every array lands whole on the first local device; pass a
    pytree of shardings matching params, or one sharding for all, to lay them out otherwise.
    Raises FileNotFoundError naming the directory when there is no such complete checkpoint.
    """
    path = epath.Path(directory)
    if "://" not in str(directory):
        path = path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    # A manager of our own, read-only: a PyTree handler (not Standard) is what allows a partial restore.
    manager = ocp.CheckpointManager(
        path,
        item_names=(_STATE, _HOST_STATE),
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(), _HOST_STATE: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = _pick_step(sorted(manager.all_steps()), step, str(path))
        tree = manager.item_metadata(step)[_STATE].tree
        if not isinstance(tree, dict) or "params" not in tree:
            raise ValueError(
                f"checkpoint {path}/{step} has no 'params' in its state (keys: "
                f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__})"
            )
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(sharding, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: sharding, tree["params"])
        else:
            shardings = _match_paths(sharding, tree["params"], f"{path}/{step}")
        target = {
            "params": jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree["params"], shardings
            )
        }
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    ),
                    _HOST_STATE: ocp.args.JsonRestore(),
                }
            ),
        )
    finally:
        manager.close()
    return restored[_STATE]["params"], dict(restored[_HOST_STATE] or {}), step


def _stored_dtypes(directory: str, step: int) -> dict:
    """{path: dtype} of the state arrays of checkpoint `step` in `directory`, from its metadata."""
    path = epath.Path(directory)
    # A read-only manager with the handler registered: the writer's manager only learns handlers
    # from the args of a save or restore, so it cannot describe a step it has not touched yet.
    manager = ocp.CheckpointManager(
        path,
        item_names=(_STATE,),
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        tree = manager.item_metadata(step)[_STATE].tree
    finally:
        manager.close()
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "dtype"))[0]
    return {_path_key(p): np.dtype(m.dtype) for p, m in flat if getattr(m, "dtype", None) is not None}


def read_host_state(directory: str, step: int | None = None) -> tuple[dict, int]:
    """(host_state, step) of a checkpoint without touching its arrays: what a reader needs (e.g. the
    recorded model config) before it can lay out the params it will read with `read_params`."""
    path = epath.Path(directory)
    if "://" not in str(directory):
        path = path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    manager = ocp.CheckpointManager(
        path,
        item_names=(_HOST_STATE,),
        item_handlers={_HOST_STATE: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = _pick_step(sorted(manager.all_steps()), step, str(path))
        restored = manager.restore(step, args=ocp.args.Composite(**{_HOST_STATE: ocp.args.JsonRestore()}))
    finally:
        manager.close()
    return dict(restored[_HOST_STATE] or {}), step


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _match_paths(shardings, stored, where: str):
    """`shardings` laid onto the stored tree by path: orbax metadata spells integer dict keys (an
    nnx layer index) as strings, so the two trees may differ in key types but not in paths."""
    by_path = {_path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}

    def pick(p, _):
        key = _path_key(p)
        if key not in by_path:
            raise ValueError(
                f"checkpoint {where}: stored param {'/'.join(key)} has no sharding in the model "
                "(was it written for another model config?)"
            )
        return by_path[key]

    return jax.tree_util.tree_map_with_path(pick, stored)


def _pick_step(steps: list[int], step: int | None, directory: str) -> int:
    """`step` if it is complete in `directory`, the newest complete one for None; else a named error."""
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory}; it has {steps}")
    return step


def _check_host_state(value, directory: str, path: str = "host_state") -> None:
    """Refuses secrets and anything that would not come back from JSON as the same value."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{path} has a non-string key {key!r} (JSON would turn it into a string); "
                    f"checkpoint {directory}"
                )
            marker = _SECRET_KEY.search(key.lower())
            if marker:
                raise ValueError(
                    f"{path}[{key!r}] looks like a secret (matches {marker.group(0)!r}) and would be written "
                    f"into checkpoint {directory}; secrets come from environment variables and never "
                    f"go into checkpoints (rename the key if it is not a secret)"
                )
            _check_host_state(item, directory, f"{path}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_host_state(item, directory, f"{path}[{i}]")
    elif value is None or isinstance(value, (bool, int, float, str)):
        # np.float64 subclasses float and dumps fine; other NumPy scalars do not, and are refused below.
        return
    else:
        hint = " (use a list)" if isinstance(value, tuple) else " (convert NumPy scalars with int()/float())"
        raise ValueError(f"{path} is a {type(value).__name__}, not plain JSON{hint}; checkpoint {directory}")


def _widens(stored: np.dtype, wanted: np.dtype) -> bool:
    """True if every value of `stored` is exactly representable in `wanted` (bf16/fp16 -> fp32, ...)."""
    if not (jnp.issubdtype(stored, jnp.floating) and jnp.issubdtype(wanted, jnp.floating)):
        return False
    s, w = jnp.finfo(stored), jnp.finfo(wanted)
    return w.nmant >= s.nmant and w.maxexp >= s.maxexp and w.minexp <= s.minexp


def _target_in_stored_dtypes(abstract_state, stored: dict, where: str):
    """The restore target with each leaf in its saved dtype, and the paths that need an upcast after."""
    upcast = []

    def pick(path, leaf):
        key = _path_key(path)
        have = stored.get(key)
        if have is None or have == np.dtype(leaf.dtype):
            return leaf
        name = "/".join(key)
        if not _widens(have, np.dtype(leaf.dtype)):
            raise ValueError(
                f"checkpoint {where}: {name} is stored as {have} but this run keeps it as "
                f"{np.dtype(leaf.dtype)}; "
                "reading it would lose precision. Set model.param_dtype to the checkpoint's dtype, or export "
                "it (python -m pr1.export) and start a new run from the exported weights"
            )
        upcast.append(name)
        return jax.ShapeDtypeStruct(leaf.shape, have, sharding=leaf.sharding)

    return jax.tree_util.tree_map_with_path(pick, abstract_state), upcast


def _check_abstract_state(abstract_state, directory: str) -> None:
    # Without a sharding orbax would fall back to the one saved in the checkpoint, which names
    # devices of the mesh that wrote it; on another topology that fails far from the cause.
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    for key_path, leaf in leaves:
        if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
            raise ValueError(
                f"restore target {jax.tree_util.keystr(key_path) or '<root>'} must be a "
                f"jax.ShapeDtypeStruct with a sharding, got {leaf!r} (see abstract_like); "
                f"checkpoint {directory}"
            )
