"""python -m pr1.eval: accuracy of a policy on the paper's math benchmarks (or our own parquet).

    python -m pr1.eval --model /models/Qwen2.5-VL-7B-Instruct \\
        --benchmark mathvista=/data/MathVista --benchmark mathverse=/data/MathVerse \\
        --benchmark mathvision=/data/MathVision --benchmark wemath=/data/WeMath --out runs/eval/base
    python -m pr1.eval --workdir runs/perception_r1 [--step 275] --benchmark mathvista=/data/MathVista \\
        --out runs/eval/pr1-275 --llm_url http://checker:30000/v1 --llm_model Qwen2.5-72B-Instruct

Writes `<out>/<benchmark>.jsonl` (one record per problem), `<out>/summary.json` and `<out>/results.md`,
and prints the overview table. Re-running with the same --out resumes: recorded problems are skipped.
docs/eval_data.md lists the files each benchmark loader expects.
"""

from __future__ import annotations

import argparse
import os
import sys

from pr1 import cli
from pr1.rollout.config import ENGINES


def _mesh(text: str) -> tuple[int, int, int]:
    sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in sizes or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(
                f"--mesh wants data=N,fsdp=N,tensor=N (one may be -1), got {text!r}"
            )
        sizes[key] = int(value)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _benchmark(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--benchmark wants NAME=PATH (e.g. mathvista=/data/MathVista), got {text!r}"
        )
    return name, path


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m pr1.eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_argument_group("the policy (one of --model / --workdir)")
    src.add_argument("--model", help="a Hugging Face checkpoint dir (Qwen2.5-VL)")
    src.add_argument("--workdir", help="a pr1 training workdir: evaluates its checkpoint --step")
    src.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    src.add_argument(
        "--assets_from", help="tokenizer/processor dir for --workdir (default: the recorded model path)"
    )
    src.add_argument("--label", help="the model's name in records and reports (default: from the path)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--engine", default="embedded", choices=list(ENGINES))
    gen.add_argument(
        "--sglang_url", action="append", default=[], help="SGLang server serving this model (repeat)"
    )
    gen.add_argument(
        "--vllm_url",
        action="append",
        default=[],
        help="vLLM server serving this model (repeat; launch/serve_vllm.sh rollout)",
    )
    gen.add_argument("--max_new_tokens", type=int, default=4096)
    gen.add_argument("--batch_size", type=int, default=32, help="problems per generate call")
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    gen.add_argument(
        "--mesh", type=_mesh, default=(1, -1, 1), help="data=1,fsdp=-1,tensor=1 (embedded engine)"
    )
    gen.add_argument(
        "--min_pixels", type=int, default=None, help="default: the processor file's (paper: 3136)"
    )
    gen.add_argument(
        "--max_pixels", type=int, default=None, help="default: the processor file's (paper: 1806336)"
    )
    data = p.add_argument_group("problems")
    data.add_argument(
        "--benchmark",
        type=_benchmark,
        action="append",
        required=True,
        help="NAME=PATH; NAME in mathvista, mathverse, mathvision, wemath, parquet (repeat)",
    )
    data.add_argument(
        "--limit", type=int, default=None, help="first N problems of each benchmark (trial runs)"
    )
    data.add_argument("--out", required=True, help="output dir for records and reports")
    llm = p.add_argument_group("LLM answer checker (optional; OpenAI-compatible server)")
    llm.add_argument("--llm_url", help="e.g. http://host:30000/v1; without it only rules check answers")
    llm.add_argument("--llm_model", default="Qwen2.5-72B-Instruct")
    llm.add_argument(
        "--llm_api_key_env",
        default="PR1_CHECKER_API_KEY",
        help="NAME of the environment variable holding the key (never the key itself)",
    )
    llm.add_argument(
        "--llm_mode",
        default="undecided",
        choices=["undecided", "all"],
        help="undecided: LLM verdict only where rules cannot decide; all: on every answer (the paper's)",
    )
    llm.add_argument("--llm_concurrency", type=int, default=64)
    llm.add_argument("--llm_retries", type=int, default=4)
    llm.add_argument("--llm_timeout", type=float, default=120.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (args.model is None) == (args.workdir is None):
        return cli.fail("pr1.eval", "give exactly one of --model DIR or --workdir DIR")
    from pr1.chat import ChatClient, ChatConfigError
    from pr1.eval import registry, report, run
    from pr1.eval.llm_check import LLMChecker

    try:
        benchmarks = {}
        for name, path in args.benchmark:
            loaded = registry.load_benchmark(name, path, limit=args.limit)
            if not loaded:
                raise ValueError(f"--benchmark {name}={path}: no problems")
            benchmarks[loaded[0].benchmark] = loaded
        llm = None
        if args.llm_url:
            client = ChatClient(
                args.llm_url,
                args.llm_model,
                role="answer checker",
                api_key_env=args.llm_api_key_env,
                max_concurrency=args.llm_concurrency,
                retries=args.llm_retries,
                timeout=args.llm_timeout,
            )
            llm = LLMChecker(client, mode=args.llm_mode)
        policy = run.load_policy(
            model=args.model,
            workdir=args.workdir,
            step=args.step,
            assets_from=args.assets_from,
            engine=args.engine,
            sglang_urls=args.sglang_url,
            vllm_urls=args.vllm_url,
            dtype=args.dtype,
            mesh=args.mesh,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            label=args.label,
        )
        os.makedirs(args.out, exist_ok=True)
        records = {}
        for name, problems in benchmarks.items():
            records[name] = run.evaluate(
                problems,
                policy,
                os.path.join(args.out, f"{name}.jsonl"),
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                llm=llm,
            )
    except (OSError, ValueError, ChatConfigError) as e:  # a missing/unreadable path, a bad value
        return cli.fail("pr1.eval", e)
    summary = report.write_report(args.out, records)
    print(report.markdown(summary, subsets=False), end="")
    print(f"records, summary.json and results.md (with per-subset tables) are in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
