"""python -m pr1.annotate --input IN.parquet --output OUT.parquet \
    --teacher_url URL --teacher_model M [--teacher_api_key_env NAME] \
    --extractor_url URL --extractor_model M [--extractor_api_key_env NAME] [--attempts 4] ...

Stage 1 (see pr1/annotate/pipeline.py): writes OUT.parquet (the training layout, with
visual_key_info and teacher_cot), OUT.parquet.summary.json, and the resumable cache
OUT.parquet.cache.jsonl; running the same command again resumes. API keys are read from the
environment variables named by the *_api_key_env flags, never passed on the command line.

Exit status: 0 every row finished; 1 some rows failed (the output holds the others; rerun to retry
them); 2 a configuration, input or cache error (nothing more was requested).
"""

from __future__ import annotations

import json
import sys

from absl import flags

from pr1 import cli

ROLES = ("teacher", "extractor")
# Flags renamed to the one dialect (pr1/cli.py): the old spelling is told the new one. The retry
# flags were shared; each service now has its own (same defaults).
RENAMED = {
    "teacher_timeout": "teacher_timeout_s",
    "extractor_timeout": "extractor_timeout_s",
    "retries": "teacher_retries and --extractor_retries",
    "backoff": "teacher_backoff_s and --extractor_backoff_s",
    "backoff_max": "teacher_backoff_max_s and --extractor_backoff_max_s",
}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("input", None, "input parquet: problem, images, answer", flag_values=fv)
    flags.DEFINE_string("output", None, "output parquet (training layout)", flag_values=fv)
    flags.DEFINE_string("cache", "", "resumable JSONL cache; default <output>.cache.jsonl", flag_values=fv)
    for role, timeout_s, max_tokens in (("teacher", 600.0, 4096), ("extractor", 180.0, 1024)):
        cli.define_service(
            fv,
            role,
            role,
            timeout_s=timeout_s,
            max_concurrency=0,
            max_concurrency_help=" (0: one per row in flight, --concurrency)",
        )
        flags.DEFINE_integer(
            f"{role}_max_tokens", max_tokens, f"max_tokens of a {role} reply", flag_values=fv
        )
    flags.DEFINE_integer("attempts", 4, "teacher CoTs per row at most, until one is correct", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "temperature of the first teacher attempt", flag_values=fv)
    flags.DEFINE_float(
        "retry_temperature",
        0.7,
        "temperature of later teacher attempts and of the extraction retry",
        flag_values=fv,
    )
    flags.DEFINE_integer("extract_attempts", 2, "extractor replies per row, until one parses", flag_values=fv)
    flags.DEFINE_integer("concurrency", 32, "rows in flight", flag_values=fv)
    flags.DEFINE_integer(
        "limit", 0, "annotate only the first N usable rows (trial runs); 0 = all", flag_values=fv
    )
    flags.DEFINE_string(
        "id_key", "id", "column of row ids (row indices when the input lacks it)", flag_values=fv
    )
    flags.DEFINE_string("problem_key", "problem", "problem text column", flag_values=fv)
    flags.DEFINE_string("answer_key", "answer", "ground-truth answer column", flag_values=fv)
    flags.DEFINE_string("images_key", "images", "images column; empty for text-only rows", flag_values=fv)
    flags.DEFINE_string(
        "image_placeholder", "<image>", "image placeholder in the problem text", flag_values=fv
    )
    flags.DEFINE_string("annotations_key", "visual_key_info", "output annotations column", flag_values=fv)
    flags.DEFINE_string("cot_key", "teacher_cot", "output column holding the kept CoT", flag_values=fv)
    flags.DEFINE_bool(
        "skip_bad_rows", False, "leave out unusable input rows instead of stopping", flag_values=fv
    )
    flags.DEFINE_integer("accuracy_workers", 2, "math-verify worker processes", flag_values=fv)
    flags.DEFINE_float("progress_interval", 5.0, "seconds between progress lines", flag_values=fv)
    flags.mark_flags_as_required(
        ["input", "output", "teacher_url", "teacher_model", "extractor_url", "extractor_model"],
        flag_values=fv,
    )


def main(argv=None) -> int:
    f = cli.parse("pr1.annotate", argv, define_flags, doc=__doc__, renamed=RENAMED)
    from pr1.annotate.cache import CacheError
    from pr1.annotate.pipeline import AnnotateOptions, ServiceOptions, annotate
    from pr1.chat import ChatConfigError

    services = {}
    for role in ROLES:
        s = cli.service(f, role)
        services[role] = ServiceOptions(
            url=s.url,
            model=s.model,
            api_key_env=s.api_key_env,
            timeout=s.timeout_s,
            max_tokens=f[f"{role}_max_tokens"].value,
            max_concurrency=s.max_concurrency,
            retries=s.retries,
            backoff=s.backoff_s,
            backoff_max=s.backoff_max_s,
        )
    try:
        opts = AnnotateOptions(
            input=f.input,
            output=f.output,
            cache=f.cache,
            **services,
            attempts=f.attempts,
            temperature=f.temperature,
            retry_temperature=f.retry_temperature,
            extract_attempts=f.extract_attempts,
            concurrency=f.concurrency,
            limit=f.limit,
            id_key=f.id_key,
            problem_key=f.problem_key,
            answer_key=f.answer_key,
            images_key=f.images_key,
            image_placeholder=f.image_placeholder,
            annotations_key=f.annotations_key,
            cot_key=f.cot_key,
            skip_bad_rows=f.skip_bad_rows,
            accuracy_workers=f.accuracy_workers,
            progress_interval=f.progress_interval,
        )
        summary = annotate(opts)
    except (ChatConfigError, CacheError, ValueError, OSError) as e:  # DataError is a ValueError
        return cli.fail("pr1.annotate", f"error: {cli.one_line(e)}")
    shown = {k: v for k, v in summary.items() if k != "failed_rows"}
    print(json.dumps(shown, indent=2))
    print(
        f"pr1.annotate: kept {summary['kept']} of {summary['rows']} rows → {opts.output} "
        f"(summary {opts.summary_path})",
        file=sys.stderr,
    )
    if summary["failed"]:
        print(
            f"pr1.annotate: {summary['failed']} rows failed (see failed_rows in {opts.summary_path}); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
