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

from absl import app, flags

from pr1 import cli

_INPUT = flags.DEFINE_string("input", None, "input parquet: problem, images, answer")
_OUTPUT = flags.DEFINE_string("output", None, "output parquet (training layout)")
_CACHE = flags.DEFINE_string("cache", "", "resumable JSONL cache; default <output>.cache.jsonl")
_SERVICES = {}
for _role, _timeout, _max_tokens in (("teacher", 600.0, 4096), ("extractor", 180.0, 1024)):
    _SERVICES[_role] = (
        flags.DEFINE_string(
            f"{_role}_url", None, f"{_role} OpenAI-compatible base URL, e.g. http://host:30000/v1"
        ),
        flags.DEFINE_string(f"{_role}_model", None, f"{_role} model name as the server knows it"),
        flags.DEFINE_string(
            f"{_role}_api_key_env",
            "",
            f"NAME of the environment variable with the {_role}'s API key (empty: no key)",
        ),
        flags.DEFINE_float(f"{_role}_timeout", _timeout, f"seconds per {_role} request"),
        flags.DEFINE_integer(f"{_role}_max_tokens", _max_tokens, f"max_tokens of a {_role} reply"),
    )
_ATTEMPTS = flags.DEFINE_integer("attempts", 4, "teacher CoTs per row at most, until one is correct")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "temperature of the first teacher attempt")
_RETRY_TEMPERATURE = flags.DEFINE_float(
    "retry_temperature", 0.7, "temperature of later teacher attempts and of the extraction retry"
)
_EXTRACT_ATTEMPTS = flags.DEFINE_integer("extract_attempts", 2, "extractor replies per row, until one parses")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 32, "rows in flight")
_RETRIES = flags.DEFINE_integer("retries", 4, "retries per request (timeouts, 429, 5xx, dropped connections)")
_BACKOFF = flags.DEFINE_float("backoff", 1.0, "first retry back-off in seconds (doubles, with jitter)")
_BACKOFF_MAX = flags.DEFINE_float("backoff_max", 30.0, "back-off cap in seconds")
_LIMIT = flags.DEFINE_integer("limit", 0, "annotate only the first N usable rows (trial runs); 0 = all")
_ID_KEY = flags.DEFINE_string("id_key", "id", "column of row ids (row indices when the input lacks it)")
_PROBLEM_KEY = flags.DEFINE_string("problem_key", "problem", "problem text column")
_ANSWER_KEY = flags.DEFINE_string("answer_key", "answer", "ground-truth answer column")
_IMAGES_KEY = flags.DEFINE_string("images_key", "images", "images column; empty for text-only rows")
_PLACEHOLDER = flags.DEFINE_string("image_placeholder", "<image>", "image placeholder in the problem text")
_ANNOTATIONS_KEY = flags.DEFINE_string("annotations_key", "visual_key_info", "output annotations column")
_COT_KEY = flags.DEFINE_string("cot_key", "teacher_cot", "output column holding the kept CoT")
_SKIP_BAD_ROWS = flags.DEFINE_bool(
    "skip_bad_rows", False, "leave out unusable input rows instead of stopping"
)
_ACCURACY_WORKERS = flags.DEFINE_integer("accuracy_workers", 2, "math-verify worker processes")
_PROGRESS_INTERVAL = flags.DEFINE_float("progress_interval", 5.0, "seconds between progress lines")
flags.mark_flags_as_required(
    ["input", "output", "teacher_url", "teacher_model", "extractor_url", "extractor_model"]
)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pr1.annotate.cache import CacheError
    from pr1.annotate.pipeline import AnnotateOptions, ServiceOptions, annotate
    from pr1.chat import ChatConfigError

    services = {
        role: ServiceOptions(
            url=f[0].value,
            model=f[1].value,
            api_key_env=f[2].value,
            timeout=f[3].value,
            max_tokens=f[4].value,
        )
        for role, f in _SERVICES.items()
    }
    try:
        opts = AnnotateOptions(
            input=_INPUT.value,
            output=_OUTPUT.value,
            cache=_CACHE.value,
            **services,
            attempts=_ATTEMPTS.value,
            temperature=_TEMPERATURE.value,
            retry_temperature=_RETRY_TEMPERATURE.value,
            extract_attempts=_EXTRACT_ATTEMPTS.value,
            concurrency=_CONCURRENCY.value,
            retries=_RETRIES.value,
            backoff=_BACKOFF.value,
            backoff_max=_BACKOFF_MAX.value,
            limit=_LIMIT.value,
            id_key=_ID_KEY.value,
            problem_key=_PROBLEM_KEY.value,
            answer_key=_ANSWER_KEY.value,
            images_key=_IMAGES_KEY.value,
            image_placeholder=_PLACEHOLDER.value,
            annotations_key=_ANNOTATIONS_KEY.value,
            cot_key=_COT_KEY.value,
            skip_bad_rows=_SKIP_BAD_ROWS.value,
            accuracy_workers=_ACCURACY_WORKERS.value,
            progress_interval=_PROGRESS_INTERVAL.value,
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
            f"pr1.annotate: {summary['failed']} rows failed (see failed_rows in {opts.summary_path}); run the "
            "same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser("pr1.annotate"))
