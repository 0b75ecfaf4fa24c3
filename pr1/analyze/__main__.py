"""python -m pr1.analyze mcnemar A.jsonl B.jsonl --label accuracy|perception [options]

Did model B get more problems right than model A, beyond chance? Pairs the per-problem records of
two `pr1.eval` runs by (benchmark, id), labels each side, and prints the 2x2 table, the discordant
counts b (A right, B wrong) and c (A wrong, B right), and the exact McNemar p-value. Put the base
model as A and the trained one as B.

The paper's perception test (50 random MathVista geometry problems, perception judged by hand):
    python -m pr1.analyze mcnemar base/mathvista.jsonl rl/mathvista.jsonl --label perception \\
        --subset task="geometry problem solving" --sample 50 --seed 0 --labels base.csv rl.csv
or with an LLM judge in place of the hand labels (labels saved for audit and re-use):
    ... --judge-url http://judge:30000/v1 --judge-model Qwen2.5-32B-Instruct \\
        --save-labels base_labels.jsonl rl_labels.jsonl
Labels-file format: see pr1/analyze/labels.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from pr1 import cli
from pr1.analyze.labels import load_annotations
from pr1.analyze.records import AnalysisError, parse_subsets
from pr1.analyze.report import mcnemar_from_files


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m pr1.analyze",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("mcnemar", help="exact McNemar test of two runs' per-problem labels")
    p.add_argument("file_a", metavar="A.jsonl", help="records of model A (the base / 'before')")
    p.add_argument("file_b", metavar="B.jsonl", help="records of model B (the trained / 'after')")
    p.add_argument(
        "--label",
        required=True,
        choices=["accuracy", "perception"],
        help="accuracy: the records' `correct`; perception: hand labels or a judge",
    )
    p.add_argument("--benchmark", help="only problems of this benchmark")
    p.add_argument(
        "--subset",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only problems whose subsets[KEY] == VALUE (repeatable; all must match)",
    )
    p.add_argument("--sample", type=int, help="draw this many paired problems at random")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--labels", nargs=2, metavar=("LABELS_A", "LABELS_B"), help="perception labels files")
    p.add_argument("--judge", choices=["lexical"], help="the offline lexical judge (approximate)")
    p.add_argument("--judge-url", help="OpenAI-compatible judge, e.g. http://host:30000/v1")
    p.add_argument("--judge-model", help="model name served at --judge-url")
    p.add_argument(
        "--judge-api-key-env",
        default="PR1_JUDGE_API_KEY",
        help="NAME of the environment variable holding the judge's API key (never printed)",
    )
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--judge-retries", type=int, default=4, help="retries of a failed judge request")
    p.add_argument("--judge-max-concurrency", type=int, default=64, help="judge requests in flight at most")
    p.add_argument(
        "--skip-failed",
        action="store_true",
        help="drop (and count) pairs whose judgement failed or that lack annotations or a response",
    )
    p.add_argument(
        "--annotations", metavar="FILE.parquet", help="visual annotations by id for records that lack them"
    )
    p.add_argument("--annotations-id-column", default="id")
    p.add_argument("--annotations-column", default="visual_key_info")
    p.add_argument(
        "--save-labels",
        nargs=2,
        metavar=("OUT_A.jsonl", "OUT_B.jsonl"),
        help="write the perception labels used (readable back with --labels)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def _judge(args):
    if args.judge_url and args.judge:
        raise AnalysisError("give --judge-url or --judge lexical, not both")
    if args.judge == "lexical":
        from pr1.rewards.judge import LexicalJudge

        return LexicalJudge()
    if args.judge_url:
        if not args.judge_model:
            raise AnalysisError("--judge-url needs --judge-model (the model name the server serves)")
        from pr1.rewards.judge import OpenAIJudge

        try:
            return OpenAIJudge(
                args.judge_url,
                args.judge_model,
                api_key_env=args.judge_api_key_env,
                timeout=args.judge_timeout,
                retries=args.judge_retries,
                max_concurrency=args.judge_max_concurrency,
            )
        except ValueError as e:
            raise AnalysisError(str(e)) from None
    return None


def _progress(side: str, done: int, total: int) -> None:
    print(f"pr1.analyze: judged {done}/{total} responses of {side}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from pr1.rewards.judge import JudgeError

    try:
        judge = _judge(args)
        annotations = None
        if args.annotations:
            annotations = load_annotations(
                args.annotations,
                id_column=args.annotations_id_column,
                annotations_column=args.annotations_column,
            )
        report = mcnemar_from_files(
            args.file_a,
            args.file_b,
            label=args.label,
            benchmark=args.benchmark,
            subsets=parse_subsets(args.subset),
            sample=args.sample,
            seed=args.seed,
            labels_files=args.labels,
            judge=judge,
            annotations=annotations,
            skip_failed=args.skip_failed,
            save_labels=args.save_labels,
            progress=_progress,
        )
    except (AnalysisError, JudgeError, OSError) as e:
        return cli.fail("pr1.analyze", e)
    print(json.dumps(report.as_dict()) if args.json else report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
