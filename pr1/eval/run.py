"""Evaluation of one policy on benchmark problems: greedy generation, answer checking, records.

Where it sits: `python -m pr1.eval` loads problems (`pr1.eval.registry.load_benchmark`), builds a
policy here (`load_policy`: an HF checkpoint dir or a pr1 training checkpoint, served by the
embedded JAX sampler, or SGLang servers already serving it), and `evaluate` writes one JSON record
per problem to `<out>/<benchmark>.jsonl` (fields in docs/eval_data.md); `pr1.eval.report` turns the
records into tables.

Decoding is the paper's: greedy, the training prompt (question + the format instruction, the same
chat template and image limits), `max_new_tokens` 4096 by default. Checking is rules first
(`pr1.eval.answers`), then the optional LLM extractor/judge (`pr1.eval.llm_check`).

Nothing finished is lost: records are appended (and flushed) batch by batch, and a re-run with the
same `--out` skips problems already recorded. Records whose LLM check failed (correct = null) keep
their response and are only re-checked, never re-generated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax.numpy as jnp

from pr1 import sharding as sharding_lib
from pr1.data.processor import Processor
from pr1.data.prompts import FORMAT_INSTRUCTION, with_instruction
from pr1.eval import answers as answers_lib
from pr1.eval.llm_check import LLMChecker
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import Prompt, SamplingParams
from pr1.rollout.config import ENGINES, rollout_config
from pr1.rollout.engines import make_engine


@dataclasses.dataclass
class Policy:
    """What generates: an engine (`RolloutEngine`), the processor that makes its prompts, a label."""

    engine: Any
    processor: Processor
    label: str


def load_policy(
    *,
    model: str | None = None,
    workdir: str | None = None,
    step: int | None = None,
    assets_from: str | None = None,
    engine: str = "embedded",
    sglang_urls: Sequence[str] = (),
    vllm_urls: Sequence[str] = (),
    dtype: str = "bfloat16",
    mesh: tuple[int, int, int] = (1, -1, 1),
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    label: str | None = None,
) -> Policy:
    """A policy from an HF checkpoint dir (`model`) or a training workdir (`workdir`, `step`).

    The tokenizer and processor files come from `model`, else `assets_from`, else the model path the
    trainer recorded in the checkpoint. With engine "sglang" or "vllm" no weights are loaded here: the
    servers at `sglang_urls` / `vllm_urls` must already serve this model (launch/serve_rollout.sh,
    launch/serve_vllm.sh rollout).
    """
    from pr1.train import checkpoint as checkpoint_lib
    from pr1.train import state as state_lib

    if (model is None) == (workdir is None):
        raise ValueError(
            "give exactly one of --model (an HF checkpoint dir) or --workdir (a pr1 training run)"
        )
    record, params_source = None, None
    if workdir is not None:
        directory = checkpoint_lib.checkpoint_directory(workdir)
        params_source = directory
        record, step = _model_record(directory, step)
        assets = assets_from or record.get("path")
        if not assets or not os.path.isdir(assets):
            raise FileNotFoundError(
                f"no tokenizer/processor files for {workdir}: the recorded model path "
                f"{record.get('path')!r} is gone; pass --assets_from DIR"
            )
        label = label or f"{os.path.basename(os.path.normpath(workdir))}@{step}"
    else:
        assets = model
        label = label or os.path.basename(os.path.normpath(model))
    processor = Processor.from_dir(assets, min_pixels=min_pixels, max_pixels=max_pixels)
    if record is not None:
        config = Qwen25VLConfig.from_hf_dict(record["hf_config"], source=f"{params_source} host_state")
    else:
        config = processor.config
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "sglang" and not sglang_urls:
        raise ValueError("--engine sglang needs --sglang_url (a server from launch/serve_rollout.sh)")
    if engine == "vllm" and not vllm_urls:
        raise ValueError("--engine vllm needs --vllm_url (a server from launch/serve_vllm.sh rollout)")
    # The training config's rollout section with its defaults: the engines evaluate as they train.
    rollout = rollout_config()
    rollout.engine = engine
    rollout.sglang.urls, rollout.vllm.urls = tuple(sglang_urls), tuple(vllm_urls)
    model_def = params = mesh_ = None
    if engine == "embedded":  # a server engine already serves the weights
        mesh_ = sharding_lib.make_mesh(*mesh)
        model_def = state_lib.ModelDef.create(config, dtype=jnp.dtype(dtype))
        if workdir is not None:
            params, _, _ = checkpoint_lib.read_params(
                params_source, step, sharding=model_def.param_shardings(mesh_)
            )
            params = _cast(params, model_def.dtype)
        else:
            params = state_lib.load_params(model, model_def, mesh_)
    policy_engine = make_engine(
        rollout,
        model_config=config,
        tokenizer=processor.tokenizer,
        pad_token_id=processor.pad_token_id,
        model_def=model_def,
        params=params,
        mesh=mesh_,
    )
    return Policy(policy_engine, processor, label)


def _model_record(directory: str, step: int | None) -> tuple[dict, int]:
    from pr1.train import checkpoint as checkpoint_lib

    host, step = checkpoint_lib.read_host_state(directory, step)
    return checkpoint_lib.recorded_model(host, f"{directory}/{step}"), step


def _cast(params, dtype):
    import jax

    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)


# ----------------------------------------------------------------------------------------------
# Checking one response


async def check_response(problem, response: str, llm: LLMChecker | None) -> dict:
    """The checking fields of a record: extracted, extracted_by, correct, checked_by, rule_correct,
    judge (raw LLM replies) and error. `correct` is None only when an LLM check was needed and failed."""
    extracted, how = answers_lib.extract_answer(response)
    out = {"extracted": extracted, "extracted_by": how, "judge": None, "error": ""}
    judge: dict = {}
    if extracted is None and llm is not None:
        r = await llm.extract(problem, response)
        judge["extractor"] = r.raw
        if not r.ok:
            return dict(out, judge=judge, correct=None, rule_correct=None, checked_by="llm", error=r.error)
        if r.value is not None:
            extracted, how = r.value, "llm"
            out.update(extracted=extracted, extracted_by=how)
    if extracted is None:  # no answer at all: wrong, whatever the checker
        return dict(out, judge=judge or None, correct=False, rule_correct=False, checked_by="rule")
    rule = answers_lib.check_answer(problem, extracted)
    out["rule_correct"] = rule
    if llm is not None and (rule is None or llm.mode == "all"):
        r = await llm.verdict(problem, extracted)
        judge["verdict"] = r.raw
        if not r.ok:
            return dict(out, judge=judge, correct=None, checked_by="llm", error=r.error)
        return dict(out, judge=judge, correct=bool(r.value), checked_by="llm")
    if rule is None:
        # Rules cannot decide and no LLM is configured: counted wrong, and the report says how many.
        return dict(out, judge=judge or None, correct=False, checked_by="rule_undecided")
    return dict(out, judge=judge or None, correct=bool(rule), checked_by="rule")


async def _check_all(items, llm: LLMChecker | None) -> list[dict]:
    async def run():
        return await asyncio.gather(*(check_response(p, r, llm) for p, r in items))

    if llm is None:
        return await run()
    async with llm.client.session():
        return await run()


# ----------------------------------------------------------------------------------------------
# Records


def read_records(path: str) -> dict[str, dict]:
    """Records by id from a records file; a torn last line (a crash mid-write) is dropped."""
    records: dict[str, dict] = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"pr1.eval: {path}: dropping a torn last line (an interrupted write)", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{i}: not a JSON record") from None
        records[str(rec["id"])] = rec  # a later line (a re-check) replaces an earlier one
    return records


def _write_records(path: str, records: Sequence[dict], mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _base_record(problem, label: str) -> dict:
    return {
        "benchmark": problem.benchmark,
        "id": problem.id,
        "subsets": dict(problem.subsets),
        "question": problem.question,
        "answer": problem.answer,
        "choices": None if problem.choices is None else list(problem.choices),
        "answer_type": problem.answer_type,
        "visual_annotations": list(problem.visual_annotations),
        "model": label,
    }


# sys.stderr looked up at each call: a default bound at import would keep whatever stream was
# installed then (a test's captured stream, closed later).
_STDERR = object()


def evaluate(
    problems: Sequence,
    policy: Policy,
    out_path: str,
    *,
    max_new_tokens: int = 4096,
    batch_size: int = 32,
    llm: LLMChecker | None = None,
    instruction: str = FORMAT_INSTRUCTION,
    progress=_STDERR,
) -> list[dict]:
    """Records of `problems` (one benchmark) in problem order, generating only what is missing.
    progress: a stream for progress lines (default: sys.stderr as it is at the call), None for none."""
    if progress is _STDERR:
        progress = sys.stderr
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{problems[0].benchmark}: problem id {dup!r} appears more than once")
    existing = read_records(out_path)
    for rec in existing.values():
        if rec.get("model") != policy.label:
            raise ValueError(
                f"{out_path} holds records of model {rec.get('model')!r}, not {policy.label!r}: "
                "use another --out (or --label) per model"
            )
    by_id = {p.id: p for p in problems}
    recheck = [existing[i] for i in ids if i in existing and existing[i].get("correct") is None]
    if recheck:
        checked = asyncio.run(_check_all([(by_id[r["id"]], r["response"]) for r in recheck], llm))
        updated = [dict(r, **c) for r, c in zip(recheck, checked)]
        _write_records(out_path, updated)
        existing.update({r["id"]: r for r in updated})
    todo = [p for p in problems if p.id not in existing]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    start, done, tokens = time.monotonic(), 0, 0
    bench = problems[0].benchmark if problems else "?"
    for b in range(0, len(todo), batch_size):
        chunk = todo[b : b + batch_size]
        prompts = [
            Prompt.build(policy.processor, with_instruction(p.question, instruction), p.images) for p in chunk
        ]
        completions = policy.engine.generate(prompts, sampling, n=1)
        checked = asyncio.run(_check_all([(p, c.text) for p, c in zip(chunk, completions)], llm))
        records = [
            dict(
                _base_record(p, policy.label),
                response=c.text,
                finish_reason=c.finish_reason,
                response_tokens=int(len(c.token_ids)),
                **k,
            )
            for p, c, k in zip(chunk, completions, checked)
        ]
        _write_records(out_path, records)
        existing.update({r["id"]: r for r in records})
        done += len(chunk)
        tokens += sum(r["response_tokens"] for r in records)
        if progress is not None:
            elapsed = time.monotonic() - start
            acc = sum(bool(r.get("correct")) for r in existing.values()) / max(len(existing), 1)
            eta = elapsed / done * (len(todo) - done)
            print(
                f"pr1.eval {bench}: {len(existing)}/{len(problems)} problems, accuracy so far {acc:.1%}, "
                f"{tokens / max(elapsed, 1e-9):.0f} tok/s, ETA {eta:.0f}s",
                file=progress,
                flush=True,
            )
    return [existing[i] for i in ids]
