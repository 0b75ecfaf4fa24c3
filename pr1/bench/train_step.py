"""Benchmark of the learner's jitted update step: tokens/s and MFU against a measured matmul peak.

    python -m pr1.bench.train_step [--batch 4 --seq 512 --steps 3 --dtype auto --remat none]

Runs `make_update_step` (AdamW, the paper's loss) on a ~90M-parameter Qwen2.5-VL-shaped model
(10 decoder layers of width 640, 4 vision blocks, 32k vocabulary), one 112x112 image per sequence,
on every local device of this machine (fsdp over all of them by default). It prints tokens/s, the
achieved FLOP/s from the model FLOP count (`pr1.bench.flops`, PaLM convention), the peak matmul
FLOP/s measured in the same run on the same devices and dtype, and their ratio (MFU). After the
compiling step, --steps update steps alternate with matmul-peak probes (`pr1.bench.ratio`): MFU is
the median of the per-pair ratios, printed with its min-max.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pr1 import cli, sharding
from pr1.bench import flops as flops_lib
from pr1.bench import ratio as ratio_lib
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.model_def import ModelDef
from pr1.models.rope import rope_index
from pr1.models.vision import batched_vision_inputs
from pr1.train import state as state_lib
from pr1.train import step as step_lib

IMAGE_GRID = (1, 8, 8)  # a 112x112 image: 64 patches, 16 image tokens after the 2x2 merge


def bench_config() -> Qwen25VLConfig:
    """Qwen2.5-VL's shape scaled down: GQA 10/2 heads of 64, SwiGLU x2.8, untied head, window+full ViT."""
    d = copy.deepcopy(tiny_hf_config())
    d["text_config"].update(
        vocab_size=32768,
        hidden_size=640,
        intermediate_size=1792,
        num_hidden_layers=10,
        num_attention_heads=10,
        num_key_value_heads=2,
        bos_token_id=32760,
        eos_token_id=32762,
        pad_token_id=32760,
    )
    d["text_config"]["rope_parameters"] = dict(d["text_config"]["rope_parameters"], mrope_section=[8, 12, 12])
    d.update(
        image_token_id=32750, video_token_id=32751, vision_start_token_id=32752, vision_end_token_id=32753
    )
    d["vision_config"].update(
        depth=4,
        hidden_size=384,
        intermediate_size=1024,
        num_heads=6,
        out_hidden_size=640,
        fullatt_block_indexes=[3],
    )
    return Qwen25VLConfig.from_hf_dict(d, source="bench_config")


def make_batch(config: Qwen25VLConfig, batch: int, seq: int, seed: int = 0) -> dict:
    """`batch` sequences of exactly `seq` tokens: an image, a prompt, and a response (the loss half)."""
    rng = np.random.default_rng(seed)
    image_tokens = int(np.prod(IMAGE_GRID)) // config.vision.spatial_merge_size**2
    if seq < image_tokens + 8:
        raise ValueError(f"--seq {seq} is too short for a {image_tokens}-token image plus text")
    ids = rng.integers(0, 32000, (batch, seq)).astype(np.int32)
    ids[:, 0] = config.vision_start_token_id
    ids[:, 1 : 1 + image_tokens] = config.image_token_id
    ids[:, 1 + image_tokens] = config.vision_end_token_id
    mask = np.ones_like(ids)
    grids = np.array([IMAGE_GRID] * batch)
    pos, _ = rope_index(config, ids, grids, mask)
    v = config.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    patches = int(np.prod(IMAGE_GRID))
    pixels = [rng.standard_normal((patches, patch_dim)).astype(np.float32) for _ in range(batch)]
    vision = batched_vision_inputs(pixels, [grids[i : i + 1] for i in range(batch)], v, num_patches=patches)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, seq // 2 :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": np.swapaxes(pos, 0, 1).astype(np.int32),
        "loss_mask": loss_mask,
        "advantages": rng.standard_normal(batch).astype(np.float32),
        **vision,
    }


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("batch", 4, "sequences per update step", flag_values=fv)
    flags.DEFINE_integer("seq", 512, "tokens per sequence (no padding)", flag_values=fv)
    flags.DEFINE_integer(
        "steps",
        5,
        "timed steps after the compiling one, each paired with a matmul-peak probe",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "dtype",
        "auto",
        ["auto", "float32", "bfloat16"],
        "params/activations dtype (auto: float32 on CPU, bfloat16 on accelerators)",
        flag_values=fv,
    )
    flags.DEFINE_enum("remat", "none", ["none", "dots", "full"], "rematerialization policy", flag_values=fv)
    flags.DEFINE_integer("micro_batches", 1, "micro-batches per update step", flag_values=fv)
    flags.DEFINE_integer("logprob_chunk", 0, "tokens per log-prob chunk (0: unchunked)", flag_values=fv)
    flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor over all local devices", flag_values=fv)
    flags.DEFINE_enum(
        "attention",
        "auto",
        ["auto", "xla", "blockwise", "cudnn", "splash"],
        "pr1.models.attention implementation (model.attention)",
        flag_values=fv,
    )


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv`, runs the benchmark (printing progress) and returns its numbers:
    params, tokens, step_s (median timed step), tokens_per_s, model_flops, achieved_flops,
    peak_flops, mfu, devices, platform, dtype."""
    args = cli.parse("pr1.bench.train_step", argv, define_flags, doc=__doc__)

    devices = jax.local_devices()
    platform = devices[0].platform
    dtype = jnp.dtype({"auto": "float32" if platform == "cpu" else "bfloat16"}.get(args.dtype, args.dtype))
    config = dataclasses.replace(bench_config(), attention=args.attention)
    mesh = sharding.make_mesh(*(int(x) for x in args.mesh.split(",")), devices=devices)
    model_def = ModelDef.create(config, dtype=dtype)
    params = state_lib.init_params(model_def, mesh, seed=0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = state_lib.make_optimizer(state_lib.optimizer_config(), total_steps=1000)
    state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)

    cfg = step_lib.learner_config()
    cfg.micro_batches, cfg.remat, cfg.logprob_chunk = args.micro_batches, args.remat, args.logprob_chunk
    batch = make_batch(config, args.batch, args.seq)
    logprob_step = step_lib.make_logprob_step(model_def, cfg, shardings.params, mesh)
    batch["old_logprobs"] = np.asarray(logprob_step(state.params, batch))
    update = step_lib.make_update_step(model_def, tx, cfg, shardings, mesh)
    print(
        f"model: {n_params / 1e6:.1f}M params ({dtype.name}); batch {args.batch} x {args.seq} tokens, one "
        f"{IMAGE_GRID[1] * 14}x{IMAGE_GRID[2] * 14} image each; mesh {dict(mesh.shape)} on "
        f"{len(devices)} {platform} device(s); remat={args.remat}, micro_batches={args.micro_batches}, "
        f"attention={args.attention}",
        flush=True,
    )

    start = time.perf_counter()
    state, metrics = update(state, batch)
    jax.block_until_ready(metrics)
    print(f"compile + first step: {time.perf_counter() - start:.1f} s", flush=True)
    tokens = args.batch * args.seq
    model_flops = flops_lib.train_flops(
        config, [args.seq] * args.batch, [int(np.prod(IMAGE_GRID))] * args.batch
    )
    probe = flops_lib.matmul_peak_probe(devices, dtype)
    holder = {"state": state}

    def one_step() -> float:
        start = time.perf_counter()
        holder["state"], m = update(holder["state"], batch)
        jax.block_until_ready(m)
        return model_flops / (time.perf_counter() - start)

    (mfu,) = ratio_lib.interleaved(
        one_step,
        probe,
        repeats=args.steps,
        warmup=0,
        label="update/peak",
        log=lambda line: print(line, flush=True),
    ).values()
    achieved, peak = mfu.ours_median, mfu.peer_median
    step_time = model_flops / achieved
    return dict(
        params=n_params,
        tokens=tokens,
        step_s=step_time,
        tokens_per_s=tokens / step_time,
        model_flops=model_flops,
        achieved_flops=achieved,
        peak_flops=peak,
        mfu=mfu.median,
        mfu_ratio=mfu,
        devices=len(devices),
        platform=platform,
        dtype=dtype.name,
    )


def main(argv=None) -> int:
    r = run(argv)
    print(f"tokens/s            {r['tokens_per_s']:12.1f}")
    print(f"model FLOP/step     {r['model_flops']:12.4g}")
    print(f"achieved FLOP/s     {r['achieved_flops']:12.4g}")
    print(
        f"peak matmul FLOP/s  {r['peak_flops']:12.4g}  (measured now: {r['devices']} x {r['dtype']} "
        "2048^3 matmuls)"
    )
    print(f"MFU                 {r['mfu']:12.3f}  (median of per-pair ratios; {r['mfu_ratio']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
