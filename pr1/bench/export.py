"""Benchmark of the weight export (`pr1.models.hf.save`) against raw file-write bandwidth.

    python -m pr1.bench.export [--model small|tiny] [--dir /path/on/the/filesystem/to/test] [--noread]

Where it sits: every `pr1.export` run and every SGLang weight sync (`pr1.rollout.sglang` pushes
the weights through disk each step) goes through `hf.save`, so its throughput bounds how often
weights can be handed over. The physical bound is measured in the same run, on the same
filesystem: the same number of bytes written with plain buffered writes and an fsync. Both timings
include an fsync of what they wrote, so both measure bytes reaching the disk, not the page cache.

It saves the random-init 97M `pr1.bench.train_step.bench_config()` model (or the tiny test model)
in float32, prints MB/s (10^6 bytes) of the export and of the raw write and their ratio (1 = the
export runs at disk speed), then, unless --noread, the same for reading back: `hf.load` against
a raw read of the same bytes (both mostly from the page cache, as right after a sync). Ours and
the raw bound alternate for --repeats pairs after a warm-up (`pr1.bench.ratio`); ratios are the
median of the pairs, printed with their min-max. Everything
is written under a temporary directory inside --dir and deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import flags

from pr1 import cli, sharding
from pr1.bench import ratio as ratio_lib
from pr1.bench.train_step import bench_config
from pr1.models import hf
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.model_def import ModelDef
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


def measure(
    config: Qwen25VLConfig,
    directory: str,
    *,
    read_back: bool = True,
    seed: int = 0,
    repeats: int = ratio_lib.MIN_REPEATS,
    log=print,
) -> dict:
    """Export a random-init `config` model (float32) under `directory` and measure the raw bound there.

    One unrecorded warm-up round, then `repeats` interleaved pairs (`pr1.bench.ratio`): hf.save +
    fsync of a fresh directory against a raw write + fsync of as many bytes; with read_back, hf.load
    against a raw read of the same bytes. Returns bytes (what the export wrote); export_s and raw_s
    (median seconds) with export_MBps / raw_MBps = bytes / those; ratio (median of the per-pair
    ratios) with ratio_min / ratio_max and write_ratio (the Ratio); with read_back the same as
    load_s, load_MBps, raw_read_MBps, read_ratio (+ _min / _max) and read_stats. Files are removed
    before returning; `directory` itself is left as it was found.
    """
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = jax.block_until_ready(state_lib.init_params(model_def, mesh, seed=seed))
    model = model_def.bind(params)
    work = tempfile.mkdtemp(prefix="pr1-bench-export-", dir=directory)
    try:
        out = os.path.join(work, "hf")
        raw_path = os.path.join(work, "raw.bin")
        hf.save(model, out)
        nbytes = _tree_bytes(out)
        rounds = {"export": [], "raw": [], "load": [], "raw_read": []}

        def export_once() -> float:
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            hf.save(model, out)
            _fsync_tree(out)
            rounds["export"].append(time.perf_counter() - start)
            return nbytes / MB / rounds["export"][-1]

        def raw_once() -> float:
            rounds["raw"].append(raw_write(raw_path, nbytes))
            return nbytes / MB / rounds["raw"][-1]

        def load_once() -> float:
            start = time.perf_counter()
            loaded = hf.load(out, dtype=jnp.float32)
            jax.block_until_ready(jax.tree.leaves(loaded))
            rounds["load"].append(time.perf_counter() - start)
            return nbytes / MB / rounds["load"][-1]

        def raw_read_once() -> float:
            read_bytes, seconds = raw_read(raw_path)
            rounds["raw_read"].append(seconds)
            return read_bytes / MB / seconds

        (write,) = ratio_lib.interleaved(
            export_once, raw_once, repeats=repeats, label="export/raw write", log=log
        ).values()
        med = lambda key: statistics.median(rounds[key][-repeats:])  # noqa: E731  (warm-up left out)
        r = dict(bytes=nbytes, export_s=med("export"), raw_s=med("raw"), repeats=repeats)
        r.update(
            export_MBps=nbytes / MB / r["export_s"],
            raw_MBps=nbytes / MB / r["raw_s"],
            ratio=write.median,
            ratio_min=write.lo,
            ratio_max=write.hi,
            write_ratio=write,
        )
        if read_back:
            (read,) = ratio_lib.interleaved(
                load_once, raw_read_once, repeats=repeats, label="hf.load/raw read", log=log
            ).values()
            r.update(load_s=med("load"), raw_read_s=med("raw_read"))
            r.update(
                load_MBps=nbytes / MB / r["load_s"],
                raw_read_MBps=nbytes / MB / r["raw_read_s"],
                read_ratio=read.median,
                read_ratio_min=read.lo,
                read_ratio_max=read.hi,
                read_stats=read,
            )
        return r
    finally:
        shutil.rmtree(work, ignore_errors=True)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "model",
        "small",
        ["small", "tiny"],
        "small: the 97M bench_config model; tiny: the test model",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "dir",
        tempfile.gettempdir(),
        "an existing directory on the filesystem to measure (a temp dir is made inside)",
        flag_values=fv,
    )
    flags.DEFINE_bool("read", True, "also time the hf.load read-back (--noread skips it)", flag_values=fv)
    flags.DEFINE_integer("repeats", ratio_lib.MIN_REPEATS, "interleaved pairs per ratio", flag_values=fv)


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv`, runs `measure` and returns its numbers (plus params, model)."""
    args = cli.parse("pr1.bench.export", argv, define_flags, doc=__doc__, renamed={"no-read": "noread"})
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"--dir {args.dir} is not an existing directory")
    config = bench_config() if args.model == "small" else Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    print(f"exporting the {args.model} model (float32) under {args.dir} ...", flush=True)
    r = measure(config, args.dir, read_back=args.read, repeats=args.repeats)
    r["model"] = args.model
    return r


def main(argv=None) -> int:
    r = run(argv)
    print(f"bytes written        {r['bytes'] / MB:10.1f} MB")
    print(f"hf.save + fsync      {r['export_MBps']:10.1f} MB/s  ({r['export_s']:.2f} s)")
    print(f"raw write + fsync    {r['raw_MBps']:10.1f} MB/s  ({r['raw_s']:.2f} s)")
    print(f"ratio export/raw     {r['ratio']:10.3f}  (median of pairs; {r['write_ratio']})")
    if "load_MBps" in r:
        print(f"hf.load              {r['load_MBps']:10.1f} MB/s  ({r['load_s']:.2f} s)")
        print(f"raw read             {r['raw_read_MBps']:10.1f} MB/s")
        print(f"ratio load/raw read  {r['read_ratio']:10.3f}  (median of pairs; {r['read_stats']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
