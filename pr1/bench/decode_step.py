"""Benchmark of one sampler decode step early in a response vs at a full response cache.

    python -m pr1.bench.decode_step [--slots 2048 --early 16 --prompts 4 --n 2 --prompt 64]
        [--attention blockwise|xla]

Runs `pr1.models.decode.decode_step` (the embedded sampler's step) of the `bench.train_step` model
with a response cache of --slots slots, once with --early slots filled and once with all of them
filled, alternating (`pr1.bench.ratio`). With blockwise attention a step reads only the cache blocks
that hold filled slots, so the early step is faster; the dense 'xla' path reads every slot whatever
is filled, so its ratio stays near 1. Prints steps/s of both and the median early/full ratio.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pr1 import cli, sharding
from pr1.bench import ratio as ratio_lib
from pr1.bench.train_step import bench_config
from pr1.models.decode import decode_step
from pr1.models.model_def import ModelDef
from pr1.train import state as state_lib


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("slots", 2048, "response cache slots (max_new_tokens)", flag_values=fv)
    flags.DEFINE_integer("early", 16, "filled slots of the early step", flag_values=fv)
    flags.DEFINE_integer("prompts", 4, "prompts in the batch", flag_values=fv)
    flags.DEFINE_integer("n", 2, "samples per prompt", flag_values=fv)
    flags.DEFINE_integer("prompt", 64, "prompt cache slots", flag_values=fv)
    flags.DEFINE_enum(
        "attention", "blockwise", ["blockwise", "xla"], "pr1.models.attention implementation", flag_values=fv
    )
    flags.DEFINE_integer("steps", 20, "decode steps per measurement", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "interleaved early/full pairs", flag_values=fv)


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv`, runs both measurements (printing each pair) and returns
    early_steps_per_s, full_steps_per_s and their ratio."""
    args = cli.parse("pr1.bench.decode_step", argv, define_flags, doc=__doc__)

    config = dataclasses.replace(bench_config(), attention=args.attention)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.init_params(model_def, mesh, seed=0)
    t = config.text
    rows = args.prompts * args.n
    rng = np.random.default_rng(0)

    def cache(batch, slots):
        shape = (t.num_hidden_layers, batch, slots, t.num_key_value_heads, t.head_dim)
        return {k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k in ("k", "v")}

    prompt_cache = cache(args.prompts, args.prompt)
    response_cache = cache(rows, args.slots)
    segments = jnp.zeros((args.prompts, args.prompt), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, 32000, rows), jnp.int32)

    @jax.jit
    def steps(params, response_cache, start):
        model = model_def.bind(params)

        def body(i, carry):
            cache, h_sum = carry
            step = start + i
            pos = jnp.broadcast_to((args.prompt + step)[None, None, None], (3, rows, 1)).astype(jnp.int32)
            h, cache = decode_step(model, tokens, pos, prompt_cache, segments, cache, step, args.n)
            return cache, h_sum + h.sum()

        return jax.lax.fori_loop(0, args.steps, body, (response_cache, jnp.float32(0)))[1]

    def measure(filled):
        start = jnp.int32(filled - args.steps)

        def one() -> float:
            begin = time.perf_counter()
            jax.block_until_ready(steps(params, response_cache, start))
            return args.steps / (time.perf_counter() - begin)

        return one

    early, full = measure(max(args.early, args.steps)), measure(args.slots)
    print(
        f"decode steps of {rows} rows ({args.prompts} prompts x {args.n}), prompt {args.prompt} slots, "
        f"response cache {args.slots} slots, attention={args.attention}: "
        f"{max(args.early, args.steps)} vs {args.slots} filled",
        flush=True,
    )
    (r,) = ratio_lib.interleaved(
        early, full, repeats=args.repeats, label="early/full", log=lambda line: print(line, flush=True)
    ).values()
    return {"early_steps_per_s": r.ours_median, "full_steps_per_s": r.peer_median, "ratio": r}


def main(argv=None) -> int:
    r = run(argv)
    print(
        f"early {r['early_steps_per_s']:.1f} steps/s, full {r['full_steps_per_s']:.1f} steps/s; "
        f"early/full {r['ratio']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
