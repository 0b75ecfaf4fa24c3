"""Benchmark of the embedded sampler against transformers' `generate` on the same model and batch.

    python -m pr1.bench.sampler [--batch 8 --prompt 128 --new 64 --model small|tiny]

Both engines get the same random-weight Qwen2.5-VL (the 97M `bench.train_step` shape, or the tiny
test model), the same batch of prompts (text, one 112x112 image each with --image), greedy decoding
without early stop, on this machine's CPU or first accelerator (transformers runs on CPU only here).
Prefill throughput = prompt tokens / time of a 1-token generation; decode throughput = the extra
tokens of a `--new`-token generation / its extra time. After a warm-up of both, pr1 and
transformers alternate for --repeats pairs (`pr1.bench.ratio`); prints the median of the per-pair
ratios with their min-max.
Needs torch (a test dependency: `pip install -r requirements-test.txt`).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pr1 import cli, sharding
from pr1.bench import ratio as ratio_lib
from pr1.bench.train_step import bench_config
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.generation import Prompt, SamplingParams
from pr1.models.model_def import ModelDef
from pr1.rollout.sampler import EmbeddedEngine
from pr1.train import state as state_lib


class _Decoder:
    """Token ids → placeholder text: the benchmark measures sampling, not detokenization."""

    def decode(self, ids, skip_special_tokens=False):
        return ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("batch", 8, "sequences per generate call", flag_values=fv)
    flags.DEFINE_integer("prompt", 128, "prompt tokens per sequence", flag_values=fv)
    flags.DEFINE_integer("new", 64, "generated tokens per sequence", flag_values=fv)
    flags.DEFINE_enum(
        "model", "small", ["small", "tiny"], "small: bench_config; tiny: the test model", flag_values=fv
    )
    flags.DEFINE_bool("image", False, "one 112x112 image per prompt", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "interleaved pr1/transformers pairs", flag_values=fv)


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv`, runs both engines (printing each one's line) and returns
    {"pr1": {"prefill", "decode"}, "transformers": {...}} in tokens/s plus prefill_ratio and
    decode_ratio (pr1 / transformers). Raises ImportError when torch or transformers is missing."""
    args = cli.parse("pr1.bench.sampler", argv, define_flags, doc=__doc__)
    try:
        import torch
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    except ImportError as e:
        raise ImportError(
            f"pr1.bench.sampler needs torch and transformers (pip install -r requirements-test.txt): {e}"
        ) from e

    hf_dict = bench_config().hf_config if args.model == "small" else copy.deepcopy(tiny_hf_config())
    torch.manual_seed(0)
    ref = Qwen2_5_VLForConditionalGeneration._from_config(
        Qwen2_5_VLConfig(**hf_dict), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    config = Qwen25VLConfig.from_hf_dict(hf_dict)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)  # the same weights for both engines, through our own loader
        params = state_lib.load_params(tmp, model_def, mesh)

    rng = np.random.default_rng(0)
    t, v = config.text, config.vision
    image_tokens = 16 if args.image else 0
    prompts = []
    for _ in range(args.batch):
        ids = rng.integers(0, min(t.vocab_size, 32000) - 100, args.prompt).astype(np.int32)
        pixels = grid = None
        if args.image:
            ids[: image_tokens + 2] = (
                [config.vision_start_token_id]
                + [config.image_token_id] * image_tokens
                + [config.vision_end_token_id]
            )
            grid = np.array([[1, 8, 8]])
            pixels = rng.standard_normal(
                (64, v.in_channels * v.temporal_patch_size * v.patch_size**2)
            ).astype(np.float32)
        prompts.append(Prompt(input_ids=ids, text="", pixel_values=pixels, image_grid_thw=grid))
    unused = t.vocab_size - 1  # a stop id random ids never produce, so every row runs to --new
    engine = EmbeddedEngine(
        model_def,
        params,
        mesh,
        _Decoder(),
        stop_token_ids=(unused,),
        pad_token_id=0,
        min_prompt_bucket=args.prompt,
        min_patch_bucket=64,
    )

    def ours(new):
        out = engine.generate(
            prompts, SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=(unused,))
        )
        assert all(len(c.token_ids) == new for c in out)

    input_ids = torch.as_tensor(np.stack([p.input_ids for p in prompts]), dtype=torch.long)
    extra = {}
    if args.image:
        extra = dict(
            pixel_values=torch.as_tensor(np.concatenate([p.pixel_values for p in prompts])),
            image_grid_thw=torch.as_tensor(np.concatenate([p.image_grid_thw for p in prompts])),
        )

    def theirs(new):
        with torch.no_grad():
            out = ref.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == config.image_token_id).to(torch.int32),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                **extra,
            )
        assert out.shape[1] == args.prompt + new

    print(
        f"model: {args.model} ({sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M params, fp32); batch "
        f"{args.batch} x {args.prompt} prompt tokens{' with one image each' if args.image else ''}, "
        f"{args.new} new tokens, greedy; pr1 on {jax.devices()[0].platform}, transformers "
        f"{torch.__version__} on CPU ({torch.get_num_threads()} threads)",
        flush=True,
    )

    def measure(run):
        def one() -> dict:
            start = time.perf_counter()
            run(1)
            t1 = time.perf_counter() - start
            start = time.perf_counter()
            run(args.new)
            tn = time.perf_counter() - start
            return {
                "prefill": args.batch * args.prompt / t1,
                "decode": args.batch * (args.new - 1) / max(tn - t1, 1e-9),
            }

        return one

    for run in (ours, theirs):
        run(args.new)  # compile / warm up the long shape; the warm-up round below does both
    ratios = ratio_lib.interleaved(
        measure(ours),
        measure(theirs),
        repeats=args.repeats,
        label="pr1/transformers",
        log=lambda line: print(line, flush=True),
    )
    for name, side in (("pr1", "ours_median"), ("transformers", "peer_median")):
        print(
            f"{name:13s} prefill {getattr(ratios['prefill'], side):10.1f} tokens/s   decode "
            f"{getattr(ratios['decode'], side):8.1f} tokens/s   (medians)",
            flush=True,
        )
    return {
        "pr1": {k: r.ours_median for k, r in ratios.items()},
        "transformers": {k: r.peer_median for k, r in ratios.items()},
        "prefill_ratio": ratios["prefill"].median,
        "decode_ratio": ratios["decode"].median,
        "ratios": ratios,
    }


def main(argv=None) -> int:
    try:
        r = run(argv)
    except ImportError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"ratio pr1/transformers: prefill {r['ratios']['prefill']}, decode {r['ratios']['decode']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
