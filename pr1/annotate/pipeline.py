"""Stage 1 of the paper: CoT distillation, the accuracy filter, and visual-annotation extraction.

    input parquet (problem, images, answer)
      └─ per row, `concurrency` rows at a time:
           teacher VLM (images + problem + the paper's format instruction), up to `attempts` CoTs
             └─ the first CoT the accuracy reward scores 1.0 (none: filtered "wrong_answer")
                  └─ extractor LLM (text only: problem + the CoT's <think> reasoning) → FIGURE facts
                       (none: filtered "no_annotations")
      └─ every finished row → the JSONL cache (fsynced); at the end, from the cache:
    output parquet (input columns + visual_key_info + teacher_cot, kept rows in input order)
    + <output>.summary.json

Choices (the paper gives none of them):
- Temperatures: the first teacher attempt uses `temperature` (default 0, the teacher's best
  answer); later attempts use `retry_temperature` (default 0.7) because repeating a greedy answer
  that was wrong would only repeat it. Extraction runs at 0; its retry (after an unparseable reply)
  uses `retry_temperature` for the same reason.
- A correct CoT whose reasoning yields no FIGURE fact is filtered ("no_annotations"), not
  re-extracted: at temperature 0 the extractor would say the same, and a row without annotations
  gives the perception reward nothing to check.
- The extractor sees the CoT's reasoning, not the figure: the annotations are what the teacher
  said it saw, as in the paper (their accuracy is the teacher's).
- A row whose teacher or extractor kept failing (retries spent), or whose extractor reply stayed
  unparseable, is "failed": reported, not cached, tried again by the next run. A correct CoT is
  cached before extraction, so that retry costs no teacher call.
- The accuracy filter is `pr1.rewards.accuracy` itself (math-verify in its process pool), so
  "correct" means exactly what it means to the training reward.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pr1.annotate import prompts
from pr1.annotate.cache import CacheError, RowCache
from pr1.annotate.source import AnnotateSource, SourceRow, content_hash, png_data_url
from pr1.chat import ChatClient
from pr1.data.prompts import FORMAT_INSTRUCTION, with_instruction
from pr1.rewards.accuracy import AccuracyScorer

log = logging.getLogger(__name__)

FILTER_REASONS = ("wrong_answer", "no_annotations")
FAILURE_STAGES = ("teacher", "extractor", "extractor_unparseable", "bad_input")


@dataclasses.dataclass(frozen=True)
class ServiceOptions:
    """One OpenAI-compatible chat server. api_key_env is the NAME of the variable holding the key."""

    url: str
    model: str
    api_key_env: str = ""
    timeout: float = 600.0  # seconds per request (a thinking teacher can take minutes)
    max_tokens: int = 4096
    max_concurrency: int = 0  # requests in flight; 0 = one per row in flight (AnnotateOptions.concurrency)
    retries: int = 4  # per request, by ChatClient (timeouts, dropped connections, 429, 5xx)
    backoff: float = 1.0
    backoff_max: float = 30.0


@dataclasses.dataclass(frozen=True)
class AnnotateOptions:
    input: str
    output: str
    teacher: ServiceOptions
    extractor: ServiceOptions
    cache: str = ""  # "" = <output>.cache.jsonl
    attempts: int = 4  # teacher CoTs per row at most, until one is correct
    temperature: float = 0.0  # first teacher attempt
    retry_temperature: float = 0.7  # later teacher attempts, and the extraction retry
    extract_attempts: int = 2  # extractor replies per row at most, until one parses
    concurrency: int = 32  # rows in flight (each has at most one request in flight)
    limit: int = 0  # the first N usable rows only; 0 = all
    id_key: str = "id"  # row ids from this column when the input has it, else row indices
    problem_key: str = "problem"
    answer_key: str = "answer"
    images_key: str = "images"
    image_placeholder: str = "<image>"
    annotations_key: str = "visual_key_info"
    cot_key: str = "teacher_cot"
    skip_bad_rows: bool = False
    format_instruction: str = FORMAT_INSTRUCTION
    accuracy_workers: int = 2
    accuracy_timeout: float = 5.0
    progress_interval: float = 5.0  # seconds between progress lines

    def __post_init__(self):
        def fail(name, msg):
            raise ValueError(f"--{name}: {msg}")

        for name in ("input", "output"):
            if not getattr(self, name):
                fail(name, "required")
        for name in ("attempts", "extract_attempts", "concurrency", "accuracy_workers"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.limit < 0:
            fail("limit", f"must be >= 0, got {self.limit}")
        for name in ("temperature", "retry_temperature"):
            if not 0 <= getattr(self, name) <= 2:
                fail(name, f"must be in [0, 2], got {getattr(self, name)}")
        for role in ("teacher", "extractor"):
            service = getattr(self, role)
            if not service.url or not service.model:
                fail(f"{role}_url" if not service.url else f"{role}_model", "required")
            if service.max_tokens < 1:
                fail(f"{role}_max_tokens", f"must be >= 1, got {service.max_tokens}")
            if service.timeout <= 0:
                fail(f"{role}_timeout_s", f"must be > 0, got {service.timeout}")
            for name in ("max_concurrency", "retries"):
                if getattr(service, name) < 0:
                    fail(f"{role}_{name}", f"must be >= 0, got {getattr(service, name)}")
        if not self.annotations_key or not self.cot_key or self.annotations_key == self.cot_key:
            fail(
                "annotations_key",
                f"annotations_key and cot_key must be two column names, got "
                f"{self.annotations_key!r}, {self.cot_key!r}",
            )
        if os.path.abspath(self.input) == os.path.abspath(self.output):
            fail("output", f"must differ from --input ({self.input})")

    @property
    def cache_path(self) -> str:
        return self.cache or self.output + ".cache.jsonl"

    @property
    def summary_path(self) -> str:
        return self.output + ".summary.json"


class _RowFailed(Exception):
    def __init__(self, stage: str, error: str):
        super().__init__(error)
        self.stage, self.error = stage, error


class Progress:
    """A line on stderr at most every `interval` seconds: rows done/total, outcomes, tokens, rate, ETA."""

    def __init__(self, total: int, already_done: int, interval: float, stream=None):
        self.total, self.already, self.interval = total, already_done, interval
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.monotonic()

    def update(self, processed: int, kept: int, filtered: int, failed: int, tokens: int, force: bool = False):
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = processed / max(now - self.start, 1e-9)
        left = self.total - self.already - processed
        eta = _hms(left / rate) if rate > 0 else "?"
        print(
            f"annotate: {self.already + processed}/{self.total} rows ({self.already} cached) | kept {kept} | "
            f"filtered {filtered} | failed {failed} | {tokens / 1000:.1f}k tokens | {rate:.2f} rows/s | "
            f"ETA {eta}",
            file=self.stream,
            flush=True,
        )


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Annotator:
    """One run of stage 1 over `opts`; `run()` does it all and returns the summary."""

    def __init__(self, opts: AnnotateOptions, *, progress_stream=None):
        self.opts = opts
        self.source = AnnotateSource(
            opts.input,
            problem_key=opts.problem_key,
            answer_key=opts.answer_key,
            images_key=opts.images_key,
            image_placeholder=opts.image_placeholder,
            id_key=opts.id_key,
            skip_bad_rows=opts.skip_bad_rows,
            limit=opts.limit,
        )
        self.counters = {"teacher": collections.Counter(), "extractor": collections.Counter()}
        self.clients = {
            role: ChatClient(
                s.url,
                s.model,
                role=role,
                api_key_env=s.api_key_env,
                max_concurrency=s.max_concurrency or opts.concurrency,
                timeout=s.timeout,
                retries=s.retries,
                backoff=s.backoff,
                backoff_max=s.backoff_max,
                counters=self.counters[role],
            )
            for role, s in (("teacher", opts.teacher), ("extractor", opts.extractor))
        }
        self.progress_stream = progress_stream
        self.outcomes: collections.Counter = collections.Counter()  # this run: kept, filtered/*, failed/*
        self.failed_rows: list[dict] = []
        self.unparseable_replies = 0

    # ---- the run

    def run(self) -> dict:
        return asyncio.run(self._run())

    async def _run(self) -> dict:
        t0 = time.monotonic()
        with RowCache(self.opts.cache_path) as self.cache:
            self._check_cache()
            todo = [r for r in self.source.rows if r.row_id not in self.cache.done]
            self.cached_outcomes = collections.Counter(rec["status"] for _, rec in self._done_records())
            self.progress = Progress(
                len(self.source),
                len(self.source) - len(todo),
                self.opts.progress_interval,
                self.progress_stream,
            )
            with AccuracyScorer(
                workers=self.opts.accuracy_workers, timeout=self.opts.accuracy_timeout
            ) as scorer:
                self.scorer = scorer
                async with self.clients["teacher"].session(), self.clients["extractor"].session():
                    await self._run_rows(todo)
            self._report_progress(force=True)
            self.write_output()
        summary = self.summary(time.monotonic() - t0)
        _write_json_atomic(self.opts.summary_path, summary)
        return summary

    def _check_cache(self) -> None:
        # Before any request: a cached row whose content changed must stop the run, not be output.
        versions = set()
        for row in self.source.rows:
            for record in (self.cache.done.get(row.row_id), self.cache.cot.get(row.row_id)):
                if record is None:
                    continue
                if record.get("hash") != content_hash(row, self.source.images(row)):
                    raise CacheError(
                        f"{self.cache.path}: row {row.index} (id {row.row_id!r}) was cached for different "
                        f"content than {self.source.path} now has (its problem, answer or images changed). "
                        "Delete the cache (or pass --cache=NEW) to annotate the new input from scratch"
                    )
                if record.get("extract_prompt"):
                    versions.add(record["extract_prompt"])
        if versions - {prompts.PROMPT_VERSION}:
            log.warning(
                "%s holds rows extracted with prompt %s; this run uses %s",
                self.cache.path,
                sorted(versions - {prompts.PROMPT_VERSION}),
                prompts.PROMPT_VERSION,
            )

    async def _run_rows(self, todo: list[SourceRow]) -> None:
        queue = iter(todo)

        async def worker():
            for row in queue:  # a shared iterator: each row is taken by exactly one worker
                await self._row(row)

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.opts.concurrency, len(todo)))]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        # A fatal error (ChatConfigError: bad URL/key/model; DataError without skip_bad_rows) stops
        # every row at once; what is already in the cache stays there.
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # Every failed task's exception is retrieved here (several workers often hit the same bad
        # URL), so none is logged later as "never retrieved" from whichever thread collects it.
        errors = [task.exception() for task in done if task.exception() is not None]
        if errors:
            raise errors[0]

    async def _row(self, row: SourceRow) -> None:
        try:
            record = await self._annotate(row)
        except _RowFailed as e:
            self.outcomes[f"failed/{e.stage}"] += 1
            self.failed_rows.append(
                {"row": row.index, "row_id": row.row_id, "stage": e.stage, "error": e.error}
            )
            log.warning(
                "%s: row %d (id %r) failed at %s: %s",
                self.source.path,
                row.index,
                row.row_id,
                e.stage,
                e.error,
            )
        else:
            self.cache.append(record)
            key = "kept" if record["status"] == "kept" else f"filtered/{record['reason']}"
            self.outcomes[key] += 1
        self._report_progress()

    async def _annotate(self, row: SourceRow) -> dict:
        try:
            images = await asyncio.to_thread(self.source.images, row)
        except ValueError as e:  # DataError: a missing or undecodable image
            if not self.opts.skip_bad_rows:
                raise
            raise _RowFailed("bad_input", str(e)) from None
        digest = content_hash(row, images)
        base = {"row_id": row.row_id, "row": row.index, "hash": digest}
        cot_record = self.cache.cot.get(row.row_id)
        if cot_record is None:
            cot_record = await self._distil(row, images, base)
            if cot_record["kind"] == "done":  # filtered: no correct CoT
                return cot_record
            self.cache.append(cot_record)
        return await self._extract(row, cot_record, base)

    async def _distil(self, row: SourceRow, images, base: dict) -> dict:
        """Teacher CoTs until one is correct: a "cot" record, or a "done" record filtered wrong_answer."""
        urls = await asyncio.to_thread(lambda: [png_data_url(im) for im in images])
        messages = prompts.teacher_messages(
            with_instruction(row.question, self.opts.format_instruction), urls
        )
        teacher, loop = self.clients["teacher"], asyncio.get_running_loop()
        tokens = [0, 0]
        for attempt in range(1, self.opts.attempts + 1):
            temperature = self.opts.temperature if attempt == 1 else self.opts.retry_temperature
            reply = await teacher.complete(
                messages, temperature=temperature, max_tokens=self.opts.teacher.max_tokens
            )
            if reply.failed:
                raise _RowFailed("teacher", reply.error)
            tokens[0] += reply.prompt_tokens
            tokens[1] += reply.completion_tokens
            score = await loop.run_in_executor(None, self.scorer.score, reply.text, row.answer)
            if score == 1.0:
                return {
                    "kind": "cot",
                    **base,
                    "teacher_attempts": attempt,
                    "cot": reply.text,
                    "tokens": {"teacher": tokens},
                }
        return {
            "kind": "done",
            **base,
            "status": "filtered",
            "reason": "wrong_answer",
            "teacher_attempts": self.opts.attempts,
            "extract_attempts": 0,
            "cot": None,
            "annotations": [],
            "tokens": {"teacher": tokens, "extractor": [0, 0]},
        }

    async def _extract(self, row: SourceRow, cot_record: dict, base: dict) -> dict:
        done = {
            "kind": "done",
            **base,
            "teacher_attempts": cot_record["teacher_attempts"],
            "cot": cot_record["cot"],
            "extract_prompt": prompts.PROMPT_VERSION,
        }
        tokens = [0, 0]
        reasoning = prompts.cot_reasoning(cot_record["cot"])
        extraction, attempt = None, 0
        if reasoning:
            messages = prompts.extractor_messages(row.question, reasoning)
            for attempt in range(1, self.opts.extract_attempts + 1):
                temperature = 0.0 if attempt == 1 else self.opts.retry_temperature
                reply = await self.clients["extractor"].complete(
                    messages, temperature=temperature, max_tokens=self.opts.extractor.max_tokens
                )
                if reply.failed:
                    raise _RowFailed("extractor", reply.error)
                tokens[0] += reply.prompt_tokens
                tokens[1] += reply.completion_tokens
                extraction = prompts.parse_extraction(reply.text)
                if extraction.parseable:
                    break
                self.unparseable_replies += 1
            else:
                raise _RowFailed(
                    "extractor_unparseable",
                    f"{self.opts.extract_attempts} extractor replies without a <facts> block or "
                    f"tagged line; the last began {reply.text[:120]!r}",
                )
        facts = list(extraction.facts) if extraction else []
        done.update(
            extract_attempts=attempt,
            annotations=facts,
            derived=list(extraction.derived) if extraction else [],
            tokens={"teacher": cot_record["tokens"]["teacher"], "extractor": tokens},
        )
        if facts:
            done.update(status="kept", reason="")
        else:
            done.update(status="filtered", reason="no_annotations")
        return done

    def _report_progress(self, force: bool = False) -> None:
        c = self.outcomes
        kept = self.cached_outcomes["kept"] + c["kept"]
        filtered = self.cached_outcomes["filtered"] + sum(
            v for k, v in c.items() if k.startswith("filtered/")
        )
        failed = sum(v for k, v in c.items() if k.startswith("failed/"))
        tokens = sum(
            self.counters[r][k] for r in self.counters for k in ("prompt_tokens", "completion_tokens")
        )
        self.progress.update(sum(c.values()), kept, filtered, failed, tokens, force=force)

    # ---- results

    def _done_records(self) -> list[tuple[SourceRow, dict]]:
        return [(r, self.cache.done[r.row_id]) for r in self.source.rows if r.row_id in self.cache.done]

    def write_output(self) -> int:
        """The kept rows in input order → the output parquet, atomically. Returns the row count."""
        kept = [(row, rec) for row, rec in self._done_records() if rec["status"] == "kept"]
        table = self.source.read_table()
        replaced = [c for c in (self.opts.annotations_key, self.opts.cot_key) if c in table.column_names]
        if replaced:
            log.warning("%s already has column(s) %s; the output replaces them", self.source.path, replaced)
        table = table.select([c for c in table.column_names if c not in replaced])
        table = table.take(pa.array([row.index for row, _ in kept], pa.int64()))
        table = table.append_column(
            self.opts.annotations_key,
            pa.array([prompts.to_info_string(rec["annotations"]) for _, rec in kept], pa.string()),
        )
        table = table.append_column(self.opts.cot_key, pa.array([rec["cot"] for _, rec in kept], pa.string()))
        out_dir = os.path.dirname(os.path.abspath(self.opts.output))
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{self.opts.output}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.opts.output)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return table.num_rows

    def summary(self, seconds: float) -> dict:
        records = self._done_records()
        kept = [rec for _, rec in records if rec["status"] == "kept"]
        filtered = collections.Counter(rec["reason"] for _, rec in records if rec["status"] == "filtered")
        tokens = {role: {"prompt_tokens": 0, "completion_tokens": 0} for role in ("teacher", "extractor")}
        for _, rec in records:
            for role in tokens:
                p, c = rec["tokens"].get(role, (0, 0))
                tokens[role]["prompt_tokens"] += p
                tokens[role]["completion_tokens"] += c
        failed = {stage: self.outcomes[f"failed/{stage}"] for stage in FAILURE_STAGES}
        n_annotations = sum(len(rec["annotations"]) for rec in kept)
        this_run = {
            role: {
                k: self.counters[role][k]
                for k in ("requests", "retries", "prompt_tokens", "completion_tokens")
            }
            for role in ("teacher", "extractor")
        }
        this_run.update(
            seconds=round(seconds, 3),
            rows=sum(self.outcomes.values()),
            unparseable_extractor_replies=self.unparseable_replies,
        )
        return {
            "input": self.source.path,
            "output": self.opts.output,
            "cache": self.opts.cache_path,
            "rows": len(self.source),
            "bad_input_rows_skipped": self.source.bad_rows,
            "kept": len(kept),
            "filtered": {reason: filtered.get(reason, 0) for reason in FILTER_REASONS},
            "failed": sum(failed.values()),
            "failed_by_stage": failed,
            "unfinished": len(self.source) - len(records),
            "teacher_attempts": sum(rec["teacher_attempts"] for _, rec in records),
            "kept_by_teacher_attempt": {
                str(k): v for k, v in sorted(collections.Counter(r["teacher_attempts"] for r in kept).items())
            },
            "extractor_attempts": sum(rec.get("extract_attempts", 0) for _, rec in records),
            "annotations": n_annotations,
            "annotations_per_kept_row": round(n_annotations / len(kept), 3) if kept else 0.0,
            "tokens": tokens,  # over the finished rows (cumulative over resumed runs)
            "this_run": this_run,  # what this run's requests cost, failed rows included
            "failed_rows": self.failed_rows[:100],
            "extract_prompt": prompts.PROMPT_VERSION,
        }


def annotate(opts: AnnotateOptions, *, progress_stream=None) -> dict:
    """Runs stage 1 (resuming from the cache) and returns the summary it also writes."""
    return Annotator(opts, progress_stream=progress_stream).run()


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
