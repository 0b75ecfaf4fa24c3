"""Benchmark of the weight export (`pr1.models.hf.save`) against raw file-write bandwidth.

    python -m pr1.bench.export [--model small|tiny] [--dir /path/on/the/filesystem/to/test] [--no-read]

Where it sits: every `pr1.export` run and every SGLang weight sync (`pr1.rollout.sglang` pushes
the weights through disk each step) goes through `hf.save`, so its throughput bounds how often
weights can be handed over. The physical bound is measured in the same run, on the same
filesystem: the same number of bytes written with plain buffered writes and an fsync. Both timings
include an fsync of what they wrote, so both measure bytes reaching the disk, not the page cache.

It saves the random-init 97M `pr1.bench.train_step.bench_config()` model (or the tiny test model)
in float32, prints MB/s (10^6 bytes) of the export and of the raw write and their ratio (1 = the
export runs at disk speed), then, unless --no-read, the same for reading back: `hf.load` against
a raw read of the same bytes (both mostly from the page cache, as right after a sync). Everything
is written under a temporary directory inside --dir and deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from pr1 import sharding
from pr1.bench.train_step import bench_config
from pr1.models import hf
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.train import state as state_lib

MB = 1e6
_CHUNK = 16 << 20  # raw I/O block: large enough that Python's per-call cost is noise


def _fsync_tree(directory: str) -> None:
    """Push every file under `directory` (and the directory entries) to the disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tree_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def raw_write(path: str, nbytes: int) -> float:
    """Seconds to write `nbytes` to `path` with buffered writes of one reused block, plus fsync."""
    block = os.urandom(min(_CHUNK, max(nbytes, 1)))  # incompressible, in case the filesystem compresses
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n] if n < len(block) else block)
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: str) -> tuple[int, float]:
    """(bytes, seconds) of reading `path` to the end into one reused buffer."""
    buf = bytearray(_CHUNK)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total, time.perf_counter() - start


def measure(config: Qwen25VLConfig, directory: str, *, read_back: bool = True, seed: int = 0) -> dict:
    """Export a random-init `config` model (float32) under `directory` and measure the raw bound there.

    Returns bytes (what the export wrote), export_s, export_MBps, raw_s, raw_MBps, ratio
    (export_MBps / raw_MBps) and, with read_back, load_s, load_MBps, raw_read_MBps, read_ratio.
    Files are removed before returning; `directory` itself is left as it was found.
    """
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    model_def = state_lib.ModelDef.create(config, dtype=jnp.float32)
    params = jax.block_until_ready(state_lib.init_params(model_def, mesh, seed=seed))
    model = model_def.bind(params)
    work = tempfile.mkdtemp(prefix="pr1-bench-export-", dir=directory)
    try:
        out = os.path.join(work, "hf")
        start = time.perf_counter()
        hf.save(model, out)
        _fsync_tree(out)
        export_s = time.perf_counter() - start
        nbytes = _tree_bytes(out)
        raw_path = os.path.join(work, "raw.bin")
        raw_s = raw_write(raw_path, nbytes)
        r = dict(bytes=nbytes, export_s=export_s, export_MBps=nbytes / MB / export_s, raw_s=raw_s,
                 raw_MBps=nbytes / MB / raw_s)
        r["ratio"] = r["export_MBps"] / r["raw_MBps"]
        if read_back:
            start = time.perf_counter()
            loaded = hf.load(out, dtype=jnp.float32)
            jax.block_until_ready(jax.tree.leaves(loaded))
            load_s = time.perf_counter() - start
            read_bytes, read_s = raw_read(raw_path)
            r.update(load_s=load_s, load_MBps=nbytes / MB / load_s, raw_read_MBps=read_bytes / MB / read_s)
            r["read_ratio"] = r["load_MBps"] / r["raw_read_MBps"]
        return r
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv`, runs `measure` and returns its numbers (plus params, model)."""
    parser = argparse.ArgumentParser(prog="python -m pr1.bench.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["small", "tiny"], default="small",
                        help="small: the 97M bench_config model; tiny: the test model")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="an existing directory on the filesystem to measure (a temp dir is made inside)")
    parser.add_argument("--no-read", dest="read", action="store_false", help="skip the hf.load read-back")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"--dir {args.dir} is not an existing directory")
    config = bench_config() if args.model == "small" else Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    print(f"exporting the {args.model} model (float32) under {args.dir} ...", flush=True)
    r = measure(config, args.dir, read_back=args.read)
    r["model"] = args.model
    return r


def main(argv=None) -> int:
    r = run(argv)
    print(f"bytes written        {r['bytes'] / MB:10.1f} MB")
    print(f"hf.save + fsync      {r['export_MBps']:10.1f} MB/s  ({r['export_s']:.2f} s)")
    print(f"raw write + fsync    {r['raw_MBps']:10.1f} MB/s  ({r['raw_s']:.2f} s)")
    print(f"ratio export/raw     {r['ratio']:10.3f}")
    if "load_MBps" in r:
        print(f"hf.load              {r['load_MBps']:10.1f} MB/s  ({r['load_s']:.2f} s)")
        print(f"raw read             {r['raw_read_MBps']:10.1f} MB/s")
        print(f"ratio load/raw read  {r['read_ratio']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
