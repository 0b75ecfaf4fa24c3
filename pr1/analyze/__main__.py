"""python -m pr1.analyze mcnemar A.jsonl B.jsonl --label accuracy|perception [options]

Did model B get more problems right than model A, beyond chance? Pairs the per-problem records of
two `pr1.eval` runs by (benchmark, id), labels each side, and prints the 2x2 table, the discordant
counts b (A right, B wrong) and c (A wrong, B right), and the exact McNemar p-value. Put the base
model as A and the trained one as B.

The paper's perception test (50 random MathVista geometry problems, perception judged by hand):
    python -m pr1.analyze mcnemar base/mathvista.jsonl rl/mathvista.jsonl --label perception \\
        --subset task="geometry problem solving" --sample 50 --seed 0 --labels base.csv,rl.csv
or with an LLM judge in place of the hand labels (labels saved for audit and re-use):
    ... --judge_url http://judge:30000/v1 --judge_model Qwen2.5-32B-Instruct \\
        --save_labels base_labels.jsonl,rl_labels.jsonl
Labels-file format: see pr1/analyze/labels.py.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from pr1 import cli
from pr1.analyze.labels import load_annotations
from pr1.analyze.records import AnalysisError, parse_subsets
from pr1.analyze.report import mcnemar_from_files

COMMANDS = ("mcnemar",)
# Flags renamed to the one dialect (pr1/cli.py) beyond '-' -> '_' (which cli.parse_args tells itself).
RENAMED = {"judge-timeout": "judge_timeout_s", "judge_timeout": "judge_timeout_s"}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "label",
        None,
        ["accuracy", "perception"],
        "accuracy: the records' `correct`; perception: hand labels or a judge",
        flag_values=fv,
    )
    flags.DEFINE_string("benchmark", None, "only problems of this benchmark", flag_values=fv)
    flags.DEFINE_multi_string(
        "subset",
        [],
        "KEY=VALUE: only problems whose subsets[KEY] == VALUE (repeatable; all must match)",
        flag_values=fv,
    )
    flags.DEFINE_integer("sample", None, "draw this many paired problems at random", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of --sample", flag_values=fv)
    flags.DEFINE_list("labels", None, "LABELS_A,LABELS_B: perception labels files", flag_values=fv)
    flags.DEFINE_enum("judge", None, ["lexical"], "the offline lexical judge (approximate)", flag_values=fv)
    cli.define_service(fv, "judge", "perception judge", api_key_env="PR1_JUDGE_API_KEY")
    flags.DEFINE_bool(
        "skip_failed",
        False,
        "drop (and count) pairs whose judgement failed or that lack annotations or a response",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "annotations",
        None,
        "FILE.parquet: visual annotations by id for records that lack them",
        flag_values=fv,
    )
    flags.DEFINE_string("annotations_id_column", "id", "id column of --annotations", flag_values=fv)
    flags.DEFINE_string(
        "annotations_column", "visual_key_info", "annotations column of --annotations", flag_values=fv
    )
    flags.DEFINE_list(
        "save_labels",
        None,
        "OUT_A.jsonl,OUT_B.jsonl: write the perception labels used (readable back with --labels)",
        flag_values=fv,
    )
    flags.DEFINE_bool("json", False, "print the result as one JSON object", flag_values=fv)


def _pair(args, name: str) -> tuple[str, str] | None:
    value = args[name].value
    if value is not None and len(value) != 2:
        raise AnalysisError(f"--{name} wants two files, A,B; got {','.join(value)!r}")
    return None if value is None else tuple(value)


def _judge(args):
    service = cli.service(args, "judge")
    if service.url and args.judge:
        raise AnalysisError("give --judge_url or --judge lexical, not both")
    if args.judge == "lexical":
        from pr1.rewards.judge import LexicalJudge

        return LexicalJudge()
    if service.url:
        if not service.model:
            raise AnalysisError("--judge_url needs --judge_model (the model name the server serves)")
        from pr1.rewards.judge import OpenAIJudge

        try:
            return OpenAIJudge(
                service.url,
                service.model,
                api_key_env=service.api_key_env,
                timeout=service.timeout_s,
                retries=service.retries,
                backoff=service.backoff_s,
                backoff_max=service.backoff_max_s,
                max_concurrency=service.max_concurrency,
            )
        except ValueError as e:
            raise AnalysisError(str(e)) from None
    return None


def _progress(side: str, done: int, total: int) -> None:
    print(f"pr1.analyze: judged {done}/{total} responses of {side}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args, positional = cli.parse_args("pr1.analyze", argv, define_flags, doc=__doc__, renamed=RENAMED)
    if not positional or positional[0] not in COMMANDS:
        cli.usage_error(
            "pr1.analyze", f"give a command: {' | '.join(COMMANDS)} (got {' '.join(positional)!r})"
        )
    if len(positional) != 3:
        cli.usage_error(
            "pr1.analyze", f"mcnemar wants two records files A.jsonl B.jsonl, got {positional[1:]}"
        )
    if args.label is None:
        cli.usage_error("pr1.analyze", "mcnemar needs --label accuracy or --label perception")
    from pr1.rewards.judge import JudgeError

    try:
        labels_files, save_labels = _pair(args, "labels"), _pair(args, "save_labels")
        judge = _judge(args)
        annotations = None
        if args.annotations:
            annotations = load_annotations(
                args.annotations,
                id_column=args.annotations_id_column,
                annotations_column=args.annotations_column,
            )
        report = mcnemar_from_files(
            positional[1],
            positional[2],
            label=args.label,
            benchmark=args.benchmark,
            subsets=parse_subsets(args.subset),
            sample=args.sample,
            seed=args.seed,
            labels_files=labels_files,
            judge=judge,
            annotations=annotations,
            skip_failed=args.skip_failed,
            save_labels=save_labels,
            progress=_progress,
        )
    except (AnalysisError, JudgeError, OSError) as e:
        return cli.fail("pr1.analyze", e)
    print(json.dumps(report.as_dict()) if args.json else report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
