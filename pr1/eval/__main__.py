"""python -m pr1.eval: accuracy of a policy on the paper's math benchmarks (or our own parquet).

    python -m pr1.eval --model /models/Qwen2.5-VL-7B-Instruct \\
        --benchmark mathvista=/data/MathVista --benchmark mathverse=/data/MathVerse \\
        --benchmark mathvision=/data/MathVision --benchmark wemath=/data/WeMath --out runs/eval/base
    python -m pr1.eval --workdir runs/perception_r1 [--step 275] --benchmark mathvista=/data/MathVista \\
        --out runs/eval/pr1-275 --checker_url http://checker:30000/v1 --checker_model Qwen2.5-72B-Instruct

Writes `<out>/<benchmark>.jsonl` (one record per problem), `<out>/summary.json` and `<out>/results.md`,
and prints the overview table. Re-running with the same --out resumes: recorded problems are skipped.
docs/eval_data.md lists the files each benchmark loader expects.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from pr1 import cli
from pr1.rollout.config import ENGINES

# Flags renamed to the one dialect (pr1/cli.py): the old spelling is told the new one.
RENAMED = {
    "llm_url": "checker_url",
    "llm_model": "checker_model",
    "llm_api_key_env": "checker_api_key_env",
    "llm_mode": "checker_mode",
    "llm_concurrency": "checker_max_concurrency",
    "llm_retries": "checker_retries",
    "llm_timeout": "checker_timeout_s",
}


def _mesh(text: str) -> tuple[int, int, int]:
    sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh wants data=N,fsdp=N,tensor=N (one may be -1), got {text!r}")
        sizes[key] = int(value)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _benchmark(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--benchmark wants NAME=PATH (e.g. mathvista=/data/MathVista), got {text!r}")
    return name, path


def define_flags(fv: flags.FlagValues) -> None:
    # the policy (one of --model / --workdir)
    flags.DEFINE_string("model", None, "a Hugging Face checkpoint dir (Qwen2.5-VL)", flag_values=fv)
    flags.DEFINE_string(
        "workdir", None, "a pr1 training workdir: evaluates its checkpoint --step", flag_values=fv
    )
    flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)
    flags.DEFINE_string(
        "assets_from",
        None,
        "tokenizer/processor dir for --workdir (default: the recorded model path)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "label", None, "the model's name in records and reports (default: from the path)", flag_values=fv
    )
    # generation
    flags.DEFINE_enum("engine", "embedded", list(ENGINES), "rollout engine", flag_values=fv)
    flags.DEFINE_multi_string("sglang_url", [], "SGLang server serving this model (repeat)", flag_values=fv)
    flags.DEFINE_multi_string(
        "vllm_url",
        [],
        "vLLM server serving this model (repeat; launch/serve_vllm.sh rollout)",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_new_tokens", 4096, "generated tokens per problem at most", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "problems per generate call", flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype", flag_values=fv)
    flags.DEFINE_string("mesh", "data=1,fsdp=-1,tensor=1", "device mesh (embedded engine)", flag_values=fv)
    flags.DEFINE_integer("min_pixels", None, "default: the processor file's (paper: 3136)", flag_values=fv)
    flags.DEFINE_integer("max_pixels", None, "default: the processor file's (paper: 1806336)", flag_values=fv)
    # problems
    flags.DEFINE_multi_string(
        "benchmark",
        None,
        "NAME=PATH; NAME in mathvista, mathverse, mathvision, wemath, parquet (repeat)",
        flag_values=fv,
    )
    flags.DEFINE_integer("limit", None, "first N problems of each benchmark (trial runs)", flag_values=fv)
    flags.DEFINE_string("out", None, "output dir for records and reports", flag_values=fv)
    flags.mark_flags_as_required(["benchmark", "out"], flag_values=fv)
    # LLM answer checker (optional)
    cli.define_service(
        fv,
        "checker",
        "LLM answer checker",
        model="Qwen2.5-72B-Instruct",
        api_key_env="PR1_CHECKER_API_KEY",
        url_help="; without it only rules check answers",
    )
    flags.DEFINE_enum(
        "checker_mode",
        "undecided",
        ["undecided", "all"],
        "undecided: LLM verdict only where rules cannot decide; all: on every answer (the paper's)",
        flag_values=fv,
    )


def main(argv: list[str] | None = None) -> int:
    args = cli.parse("pr1.eval", argv, define_flags, doc=__doc__, renamed=RENAMED)
    try:
        mesh = _mesh(args.mesh)
        benchmark_paths = [_benchmark(b) for b in args.benchmark]
    except ValueError as e:  # a bad flag value: exits 2 as absl's own flag errors do
        cli.usage_error("pr1.eval", e)
    if (args.model is None) == (args.workdir is None):
        return cli.fail("pr1.eval", "give exactly one of --model DIR or --workdir DIR")
    from pr1.chat import ChatClient, ChatConfigError
    from pr1.eval import registry, report, run
    from pr1.eval.llm_check import LLMChecker

    try:
        benchmarks = {}
        for name, path in benchmark_paths:
            loaded = registry.load_benchmark(name, path, limit=args.limit)
            if not loaded:
                raise ValueError(f"--benchmark {name}={path}: no problems")
            benchmarks[loaded[0].benchmark] = loaded
        llm = None
        checker = cli.service(args, "checker")
        if checker.url:
            client = ChatClient(
                checker.url,
                checker.model,
                role="answer checker",
                api_key_env=checker.api_key_env,
                max_concurrency=checker.max_concurrency,
                retries=checker.retries,
                timeout=checker.timeout_s,
                backoff=checker.backoff_s,
                backoff_max=checker.backoff_max_s,
            )
            llm = LLMChecker(client, mode=args.checker_mode)
        policy = run.load_policy(
            model=args.model,
            workdir=args.workdir,
            step=args.step,
            assets_from=args.assets_from,
            engine=args.engine,
            sglang_urls=args.sglang_url,
            vllm_urls=args.vllm_url,
            dtype=args.dtype,
            mesh=mesh,
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
