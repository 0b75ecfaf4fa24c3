"""The `data` section of a training config and its checks (`data_config`, `check_data_config`)."""

from __future__ import annotations

import ml_collections

from pr1.data.prompts import FORMAT_INSTRUCTION


def data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config."""
    c = ml_collections.ConfigDict()
    # Tuples, not lists: `--config.data.train_files='("a.parquet",)'` can override a tuple.
    c.train_files = ()  # parquet paths
    c.val_files = ()  # held-out split; empty = no validation
    c.problem_key = "problem"
    c.answer_key = "answer"
    c.images_key = "images"  # "" = text-only data
    c.annotations_key = "visual_key_info"  # "" = no visual annotations (the GRPO baseline's data)
    c.image_placeholder = "<image>"
    # Joined as `question.strip() + " " + format_instruction`, which is EasyR1's
    # `{{ content | trim }} <instruction>` format prompt; "" leaves the question alone.
    c.format_instruction = FORMAT_INSTRUCTION
    c.system_prompt = ml_collections.config_dict.placeholder(str)  # None: the chat template's default
    c.max_prompt_length = 4096  # tokens, image tokens included; longer prompts are filtered
    # A row with more visual annotations is a bad row (named at open): each is one numbered item of
    # the judge's prompt and one verdict it must write, so hundreds would overflow the judge's context
    # (rewards.judge.max_prompt_tokens guards each request too). The paper's rows have a handful.
    c.max_annotations = 64
    c.min_pixels = ml_collections.config_dict.placeholder(int)  # None: the processor's value
    c.max_pixels = ml_collections.config_dict.placeholder(int)
    c.shuffle = True
    c.seed = 0
    # Rows whose images pass the header check at open but do not decode when read are skipped and
    # counted (data/bad_rows) up to this many distinct rows; one more stops the run naming them all.
    # 0: the first such row stops the run. skip_bad_rows=True skips any number of bad rows, found at
    # open (bad fields, image headers) or later.
    c.max_bad_rows = 10
    c.skip_bad_rows = False
    c.prompts_per_step = 128  # prompts per step over all processes (each gets an equal share)
    # Training batches never straddle epochs; the last partial batch of an epoch is dropped (its
    # prompts come back in later epochs, reshuffled), as verl/EasyR1's drop_last does. Validation
    # always keeps its last partial batch.
    c.drop_remainder = True
    c.num_threads = 2  # grain threads that decode images and build prompts
    c.prefetch_prompts = ml_collections.config_dict.placeholder(int)  # None: prompts_per_step
    return c


def check_data_config(cfg, prefix: str = "data") -> None:
    """Raise ValueError naming the key for a value that cannot work (before anything is opened)."""

    def fail(key, msg):
        raise ValueError(f"config {prefix}.{key}: {msg}")

    for key in ("train_files", "val_files"):
        files = cfg[key]
        if isinstance(files, str):
            files = [files]
        if not all(isinstance(f, str) and f for f in files):
            fail(key, f"must be a list of parquet paths, got {files!r}")
    if not cfg.problem_key or not cfg.answer_key:
        fail("problem_key" if not cfg.problem_key else "answer_key", "must name a column")
    if int(cfg.max_prompt_length) < 1:
        fail("max_prompt_length", f"must be >= 1, got {cfg.max_prompt_length}")
    if int(cfg.prompts_per_step) < 1:
        fail("prompts_per_step", f"must be >= 1, got {cfg.prompts_per_step}")
    if int(cfg.num_threads) < 0:
        fail("num_threads", f"must be >= 0, got {cfg.num_threads}")
    if int(cfg.max_annotations) < 1:
        fail("max_annotations", f"must be >= 1, got {cfg.max_annotations}")
    if int(cfg.max_bad_rows) < 0:
        fail("max_bad_rows", f"must be >= 0, got {cfg.max_bad_rows}")
    if cfg.prefetch_prompts is not None and int(cfg.prefetch_prompts) < 0:
        fail("prefetch_prompts", f"must be >= 0, got {cfg.prefetch_prompts}")
    for key in ("min_pixels", "max_pixels"):
        if cfg[key] is not None and int(cfg[key]) <= 0:
            fail(key, f"must be positive or None, got {cfg[key]}")
    if cfg.min_pixels is not None and cfg.max_pixels is not None and cfg.min_pixels > cfg.max_pixels:
        fail("min_pixels", f"{cfg.min_pixels} is above data.max_pixels {cfg.max_pixels}")
