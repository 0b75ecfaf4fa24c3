"""`python -m tests.fault_inject <pr1.train flags>`: pr1.train with one fault injected, chosen by the
environment variable PR1_TEST_FAULT (for tests/test_faults.py; faults the command line cannot cause):

  nan@K     the advantages of the K-th step of this process are NaN, so its loss and gradients are
  enospc@K  every file opened for writing under checkpoints/K.orbax-checkpoint-tmp fails with ENOSPC
            (disk full): the save of step K fails in orbax's background write, as on a full disk or
            a directory that became unwritable mid-save
"""

import builtins
import errno
import os
import runpy
import sys

import numpy as np


def _nan_advantages(step: int) -> None:
    from pr1.rl import grpo

    real = grpo.group_advantages
    calls = [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        out = np.asarray(real(*args, **kwargs))
        return np.full(out.shape, np.nan, out.dtype) if calls[0] == step else out

    grpo.group_advantages = poisoned


def _disk_full(step: int) -> None:
    marker = f"{os.sep}checkpoints{os.sep}{step}.orbax-checkpoint-tmp"
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and marker in str(file) and any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = guarded


def main() -> None:
    kind, _, step = os.environ["PR1_TEST_FAULT"].partition("@")
    {"nan": _nan_advantages, "enospc": _disk_full}[kind](int(step))
    sys.argv = ["pr1.train", *sys.argv[1:]]
    runpy.run_module("pr1.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
