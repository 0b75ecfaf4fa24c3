"""Checkpointer: bit-exact sharded round trips, retention, and that only committed saves count."""

import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pr1.train.checkpoint import Checkpointer, abstract_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX


def _mesh(rows, cols):
    return Mesh(np.array(jax.devices()).reshape(rows, cols), ("fsdp", "tensor"))


SPECS = {
    "params": {"w": P("fsdp", "tensor"), "b": P("tensor")},
    "opt": {"count": P("fsdp", None)},
    "step": P(),
}


def _host_values():
    w = np.linspace(-3, 3, 8 * 16, dtype=np.float32).reshape(8, 16)
    # Values a lossy path would mangle: NaN payload, -0.0, inf, a subnormal.
    w[0, :4] = [np.nan, -0.0, np.inf, np.float32(1e-40)]
    b = (np.arange(16, dtype=np.float32) / 7 - 1).astype(ml_dtypes.bfloat16)
    count = (np.arange(32, dtype=np.int32) * 7919 - 100_000).reshape(8, 4)
    return {"params": {"w": w, "b": b}, "opt": {"count": count}, "step": np.int32(123)}


def _put(values, mesh):
    return jax.tree.map(lambda v, s: jax.device_put(v, NamedSharding(mesh, s)), values, SPECS)


def _bits(a):
    a = np.asarray(jax.device_get(a))
    return a.dtype, a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _assert_bit_exact(restored, expected):
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        (gd, gb), (wd, wb) = _bits(got), _bits(want)
        assert gd == wd
        np.testing.assert_array_equal(gb, wb)


def _step_dirs(directory):
    return sorted(os.listdir(directory))


HOST_STATE = {
    "data": {"epoch": 1, "position": 4096, "files": ["train-00000.parquet"]},
    "rng_seed": 42,
    "reward_ema": 0.25,
    "note": None,
    "done": False,
}


def test_round_trip_is_bit_exact_into_same_and_other_shardings(tmp_path):
    values = _host_values()
    state = _put(values, _mesh(2, 4))
    abstract = abstract_like(state)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        assert ckpt.save(7, state, HOST_STATE)
        # The next jitted step donates the state; the async save must already hold its own copy.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()

        restored, host = ckpt.restore(abstract)
        assert host == HOST_STATE
        _assert_bit_exact(restored, values)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
            assert got.sharding == want.sharding

        other = _mesh(8, 1)
        targets = {
            "8x1": jax.tree.map(lambda s: NamedSharding(other, s), SPECS),
            "replicated": jax.tree.map(lambda s: NamedSharding(other, P()), SPECS),
        }
        for shardings in targets.values():
            target = jax.tree.map(
                lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings
            )
            restored, host = ckpt.restore(target, step=7)
            assert host == HOST_STATE
            _assert_bit_exact(restored, values)
            for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
                assert got.sharding == want


def _small_state(value):
    return {"x": jnp.full((8,), value, dtype=jnp.float32)}


def _small_abstract():
    return abstract_like(_small_state(0))


def test_keep_retains_newest_and_latest_step_after_async_saves(tmp_path):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, _small_state(step), {"step": step})
        ckpt.wait()
        assert ckpt.latest_step() == 5
        assert ckpt.all_steps() == [4, 5]
        state, host = ckpt.restore(_small_abstract(), step=4)
        assert host == {"step": 4} and float(state["x"][0]) == 4.0
        with pytest.raises(FileNotFoundError, match="step 2"):
            ckpt.restore(_small_abstract(), step=2)
    # Old steps are deleted from disk, not just forgotten.
    assert _step_dirs(directory) == ["4", "5"]
    with Checkpointer(directory, keep=2) as reopened:
        assert reopened.all_steps() == [4, 5]


def test_save_in_flight_is_not_visible_until_committed(tmp_path, monkeypatch):
    directory = str(tmp_path / "ckpt")
    release = threading.Event()
    commit = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def held_commit(self):
        release.wait(timeout=60)
        return await commit(self)

    with Checkpointer(directory, keep=1) as ckpt:
        ckpt.save(1, _small_state(1), {"step": 1})
        ckpt.wait()
        monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", held_commit)
        try:
            assert ckpt.save(2, _small_state(2), {"step": 2})
            # Written but not committed: orbax itself already lists 2 and has dropped 1 (keep=1).
            assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
            assert "2" not in _step_dirs(directory)
        finally:
            release.set()
        state, host = ckpt.restore(_small_abstract())  # waits for the commit
        assert host == {"step": 2} and float(state["x"][0]) == 2.0
        assert ckpt.all_steps() == [2]


def test_host_state_is_captured_when_save_returns(tmp_path, monkeypatch):
    release = threading.Event()
    write = ocp.handlers.JsonCheckpointHandler._save_fn

    async def held_write(self, x, directory):
        release.wait(timeout=60)
        return await write(self, x, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", held_write)
    host = {"data": {"position": 1}}
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        try:
            ckpt.save(1, _small_state(1), host)
            host["data"]["position"] = 2  # the loop moves on while the JSON is still being written
        finally:
            release.set()
        assert ckpt.restore(_small_abstract())[1] == {"data": {"position": 1}}


_CRASHING_RUN = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from pr1.train.checkpoint import Checkpointer

    commit = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def die_at_step_2_commit(self):
        if self.get_final().name == "2":
            os._exit(17)  # a pre-emption: no cleanup, no atexit, no flush
        return await commit(self)

    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = die_at_step_2_commit
    ckpt = Checkpointer(sys.argv[1])
    for step in (1, 2):
        ckpt.save(step, {"x": jnp.full((8,), step, dtype=jnp.float32)}, {"step": step})
        ckpt.wait()
    sys.exit(0)
""")


def test_crashed_save_is_ignored_and_run_resumes_from_last_complete(tmp_path):
    directory = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-c", _CRASHING_RUN, directory],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 17, run.stderr[-3000:]
    # What a crash at the commit leaves: step 2 fully written, but only under its temporary name.
    assert _step_dirs(directory) == ["1", "2" + TMP_SUFFIX]

    with Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        state, host = ckpt.restore(_small_abstract())
        assert host == {"step": 1} and float(state["x"][0]) == 1.0
        with pytest.raises(FileNotFoundError):
            ckpt.restore(_small_abstract(), step=2)
        # The resumed run redoes step 2; the leftover is cleaned up, not mistaken for it.
        assert ckpt.save(2, _small_state(2), {"step": 2})
        ckpt.wait()
        assert ckpt.latest_step() == 2
        assert ckpt.restore(_small_abstract())[1] == {"step": 2}
    assert _step_dirs(directory) == ["1", "2"]


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    directory = str(tmp_path / "empty")
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=directory):
            ckpt.restore(_small_abstract())


@pytest.mark.parametrize(
    "host_state, key",
    [
        ({"api_key": "sk-123"}, "api_key"),
        ({"OPENAI_API_KEY": "sk-123"}, "OPENAI_API_KEY"),
        ({"judge": {"AuthToken": "abc"}}, "AuthToken"),
        ({"servers": [{"client_secret": "abc"}]}, "client_secret"),
    ],
)
def test_secret_looking_host_state_keys_are_refused(tmp_path, host_state, key):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, async_save=False) as ckpt:
        with pytest.raises(ValueError, match=key):
            ckpt.save(1, _small_state(1), host_state)
        assert ckpt.all_steps() == []
    assert _step_dirs(directory) == []


def test_counters_named_like_tokens_are_not_secrets(tmp_path):
    host = {"num_tokens": 5, "tokens_seen": 7, "tokenizer_path": "/x", "data": {"token_budget": 1}}
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        assert ckpt.save(1, _small_state(1), host)
        _, restored = ckpt.restore(abstract_like(_small_state(1)))
    assert restored == host


@pytest.mark.parametrize("host_state", [{"shape": (2, 3)}, {"count": np.int64(3)}, {1: "a"}])
def test_host_state_that_json_would_change_is_refused(tmp_path, host_state):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        with pytest.raises(ValueError, match="host_state"):
            ckpt.save(1, _small_state(1), host_state)


def test_restore_target_without_sharding_is_refused(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
        ckpt.save(1, _small_state(1))
        with pytest.raises(ValueError, match=r"\['x'\]"):
            ckpt.restore({"x": jax.ShapeDtypeStruct((8,), jnp.float32)})
        assert ckpt.restore(_small_abstract())[1] == {}


def test_save_interval_and_force(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), async_save=False, save_interval_steps=10) as ckpt:
        assert not ckpt.save(5, _small_state(5))
        assert ckpt.save(10, _small_state(10))
        assert ckpt.save(13, _small_state(13), force=True)
        assert ckpt.all_steps() == [10, 13]


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpointer("runs/ckpt") as ckpt:
        assert ckpt.directory == str(tmp_path / "runs" / "ckpt")
        ckpt.save(1, _small_state(1), {"step": 1})
        ckpt.wait()
        assert ckpt.restore(_small_abstract())[1] == {"step": 1}


def _refuse_writes_under(monkeypatch, marker):
    """The filesystem refuses (disk full) every file opened for writing whose path contains `marker`:
    what orbax's background write meets when the checkpoint disk fills or the directory becomes
    unwritable mid-save."""
    import builtins
    import errno

    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if marker in str(file) and any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


@pytest.mark.parametrize("when", ["next_save", "close"])
def test_failed_save_names_the_path_and_the_last_checkpoint_restores(tmp_path, monkeypatch, when):
    from pr1.train.checkpoint import CheckpointSaveError

    state = {"w": jnp.arange(8, dtype=jnp.float32)}
    directory = tmp_path / "ckpt"
    _refuse_writes_under(monkeypatch, f"{os.sep}2.orbax-checkpoint-tmp")
    ck = Checkpointer(str(directory), keep=None)
    assert ck.save(1, state, {"step": 1}) and ck.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})
    with pytest.raises(CheckpointSaveError) as info:
        if when == "next_save":
            ck.save(3, state, {"step": 3})  # joins step 2's background write first
        else:
            ck.close()
    message = str(info.value)
    assert f"checkpoint save of step 2 to {directory}/2 failed" in message, message
    assert (
        "No space left on device" in message
        and "newest complete checkpoint" in message
        and "step 1" in message
    )
    ck.close()  # reported once: closing afterwards does not raise it again
    monkeypatch.undo()
    again = Checkpointer(str(directory), keep=None)
    assert again.all_steps() == [1]
    restored, host = again.restore(abstract_like(state))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(8, dtype=np.float32))
    assert host == {"step": 1}
    again.close()
    # (Saving step 2 again over the leftovers is what a resumed run does: tests/test_run_faults.py,
    # in a new process as a resume is; here orbax's abandoned writes of the failed save may still land.)
