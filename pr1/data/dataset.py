"""The per-process data iterator: checked parquet rows → batches of rollout prompts, with grain.

Data flow: `rows.ParquetRows` reads and checks every file's cheap columns and image headers, so a
broken file fails before any compilation (the row layout is described there); `PromptIterator`
shuffles row indices with grain (seeded, reshuffled every epoch), gives each process its own share
of every epoch, and in grain's prefetch threads decodes the images and builds each `Prompt` (chat
template, image patches; `prompts`) lazily, one row at a time. The training loop takes
`prompts_per_step` `Example`s per step, rolls out n responses for each on this process (so a GRPO
group never crosses hosts), and stores `get_state()` in its checkpoint; `set_state` resumes at
exactly the next batch.

An image whose header is fine but whose pixels do not decode (a truncated file) is only found when
its row is read during the run. Such a row is skipped, logged by name and counted (`bad_rows`),
up to `data.max_bad_rows` distinct rows; one more stops the run with an error naming every file
and row. The rows found bad are part of the iterator state, so a resumed run skips them too and
never replays into the same crash.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from typing import Sequence

import grain
import numpy as np

from pr1 import distributed
from pr1.data.config import check_data_config
from pr1.data.prompts import with_instruction, with_pixel_limits
from pr1.data.rows import DataError, ParquetRows, count_skip, row_error, zero_stats
from pr1.models.generation import Prompt

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One prompt ready for rollout, with what the rewards need."""

    uid: str  # "<file>:<row>", stable across runs and epochs
    question: str  # the problem without image placeholders
    prompt_question: str  # the user text the model sees: question + format instruction
    answer: str  # ground truth for the accuracy reward
    annotations: list[str]  # visual annotations for the perception reward
    images: list[np.ndarray]  # decoded HxWx3 uint8
    prompt: Prompt  # tokenized, images preprocessed
    epoch: int


@dataclasses.dataclass(frozen=True)
class _Skipped:
    reason: str  # a BAD_ROW_REASONS entry, or "too_long"
    message: str
    uid: str = ""
    error: DataError | None = None  # a bad row met while reading (not a filtered long prompt)


class PromptIterator:
    """Batches (lists) of `Example`s for this process: prompts_per_step / process_count each.

    train=True: endless epochs, each a fresh grain shuffle of all rows (seed, epoch), cut into
    global batches of prompts_per_step positions; process p takes the p-th block of
    B = prompts_per_step / count positions of each (positions after the last whole batch go
    round-robin). So, without filtered rows, its step-s batch is exactly rows [p·B, (p+1)·B) of a
    one-process run's step-s batch: k processes train on the same global batches, in the same row
    order, as one. Full batches never straddle an epoch (see data.drop_remainder). train=False: one
    pass in file order (shuffled if shuffle=True), process p taking positions p, p + count, ...; the
    last batch possibly short. Prompts over max_prompt_length tokens and (with skip_bad_rows) bad
    rows are left out and counted in `stats`, so processes may consume their shares at different
    rates; each keeps its own state (`gather_states` collects them).

    `stats`: bad rows found at open are counted once; bad images and long prompts every time they
    are met (once per epoch). `epoch` is the epoch of the last batch returned.
    """

    def __init__(
        self,
        files: Sequence[str] | str,
        processor,
        cfg,
        *,
        train: bool = True,
        shuffle: bool | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        check_data_config(cfg)
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        self.cfg = cfg
        self.train = bool(train)
        self.shuffle = bool(cfg.shuffle if shuffle is None else shuffle)
        self.seed = int(cfg.seed)
        if int(cfg.prompts_per_step) % int(process_count):
            raise ValueError(
                f"config data.prompts_per_step={cfg.prompts_per_step} does not split evenly over "
                f"{process_count} processes"
            )
        self.batch_size = int(cfg.prompts_per_step) // int(process_count)  # this process's prompts per step
        self.drop_remainder = bool(cfg.drop_remainder) and self.train
        self.max_prompt_length = int(cfg.max_prompt_length)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.processor = with_pixel_limits(processor, cfg.min_pixels, cfg.max_pixels)
        self.source = ParquetRows(files, cfg)
        n = len(self.source)
        if n == 0:
            raise DataError(
                f"no usable rows in {[f.path for f in self.source.files]} (stats {self.source.stats})"
            )
        # Training splits every global batch into per-process blocks; the other split is round-robin.
        self._block = self.batch_size if self.train else 1
        whole = n // (self._block * self.process_count)  # global batches (or rounds) per epoch
        self._blocked = whole * self._block  # this process's positions inside them
        self._tail_start = whole * self._block * self.process_count
        self.per_epoch = self._blocked + len(
            range(self._tail_start + self.process_index, n, self.process_count)
        )
        if self.per_epoch == 0:
            raise DataError(
                f"{n} rows cannot be shared by {self.process_count} processes: process "
                f"{self.process_index} gets none"
            )
        if self.train and self.drop_remainder and self.per_epoch < self.batch_size:
            raise ValueError(
                f"config data.prompts_per_step={cfg.prompts_per_step} asks {self.batch_size} prompts of "
                f"process {self.process_index} per step but it gets {self.per_epoch} per epoch: no "
                "batch would ever be full"
            )
        if self.train and not self.drop_remainder and self.process_count > 1:
            raise ValueError(
                "config data.drop_remainder=False with several processes would give them batches "
                "of different sizes at epoch ends; set it True"
            )

        rows = grain.MapDataset.source(self.source)
        if self.shuffle:
            rows = rows.shuffle(seed=self.seed)  # reshuffled every epoch by repeat()
        if self.train:
            rows = rows.repeat(None)
        self._rows = rows
        total = sys.maxsize if self.train else self.per_epoch
        self._elements = grain.MapDataset.range(total).map(self._element)
        self._read = grain.ReadOptions(
            num_threads=int(cfg.num_threads),
            prefetch_buffer_size=int(
                self.batch_size if cfg.prefetch_prompts is None else cfg.prefetch_prompts
            ),
        )
        self._lock = threading.Lock()
        self._start(0)
        self.max_bad_rows = int(cfg.max_bad_rows)
        self._bad: dict[str, dict] = {}  # uid -> the error of a row found bad while reading
        self.stats = dict(self.source.stats)
        self.stats["bad_rows"] = self.source.stats["skipped_bad_rows"]
        self.epoch = 0  # epoch of the last batch returned
        self.batches = 0  # batches returned so far
        self._epoch_yield = 0  # examples returned in the current epoch (to catch an all-filtered epoch)

    # An element j of this process's stream: epoch j // per_epoch, and in that epoch's shuffled order
    # the position of its k-th element (one process: position k).
    def _element(self, j: int):
        epoch, k = divmod(j, self.per_epoch)
        fi, row = self._rows[epoch * len(self.source) + self._position_in_epoch(k)]
        return self._example(fi, row, epoch)

    def _position_in_epoch(self, k: int) -> int:
        if k < self._blocked:
            batch, offset = divmod(k, self._block)
            return (batch * self.process_count + self.process_index) * self._block + offset
        return self._tail_start + self.process_index + (k - self._blocked) * self.process_count

    def _example(self, fi: int, row: int, epoch: int):
        f = self.source.files[fi]
        uid = f"{f.name}:{row}"
        known = self._bad.get(uid)
        if known is not None:  # found bad before (this run or the one it resumes): not read again
            return _Skipped(
                known["reason"],
                known["message"],
                uid,
                DataError(
                    known["message"],
                    path=known["path"],
                    row=known["row"],
                    field=known["field"],
                    reason=known["reason"],
                ),
            )
        question, instruction = f.questions[row], self.cfg.format_instruction
        try:
            images = self.source.images(fi, row)
            full = with_instruction(question, instruction)
            try:
                prompt = Prompt.build(self.processor, full, images, system=self.cfg.system_prompt)
            except (ValueError, TypeError) as e:
                raise row_error(f.path, row, self.cfg.problem_key, "unprocessable", str(e)) from None
        except DataError as e:
            # Decided on the consuming thread (`_bad_row`): skip and count, or stop past the limit.
            return _Skipped(e.reason, str(e), uid, e)
        if len(prompt.input_ids) > self.max_prompt_length:
            return _Skipped("too_long", f"{f.path}: row {row}: {len(prompt.input_ids)} prompt tokens")
        return Example(
            uid=uid,
            question=question,
            prompt_question=full,
            answer=f.answers[row],
            annotations=list(f.annotations[row]),
            images=images,
            prompt=prompt,
            epoch=epoch,
        )

    def _start(self, position: int) -> None:
        # The grain iterator (and its prefetch threads) starts on the first batch, so that a resumed
        # run does not first build prompts from position 0.
        self._position = position
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> list[Example]:
        with self._lock:
            batch: list[Example] = []
            while len(batch) < self.batch_size:
                if not self.train and self._position >= self.per_epoch:
                    break
                if self._it is None:
                    self._it = iter(self._elements[self._position :].to_iter_dataset(self._read))
                j = self._position
                item = next(self._it)
                self._position += 1
                if isinstance(item, _Skipped):
                    if item.error is not None:
                        self._bad_row(item)
                    count_skip(self.stats, item.reason)
                else:
                    batch.append(item)
                    self._epoch_yield += 1
                if (j + 1) % self.per_epoch == 0:  # the epoch ends with element j
                    if self.train and self._epoch_yield == 0:
                        raise DataError(
                            f"a whole epoch of process {self.process_index} gave no prompt: every row "
                            f"was filtered or skipped (stats {self.stats})"
                        )
                    self._epoch_yield = 0
                    if len(batch) == self.batch_size or not batch:
                        continue
                    if self.drop_remainder:
                        self.stats["dropped_remainder"] += len(batch)
                        batch = []
                        continue
                    break
            if not batch:
                raise StopIteration
            self.epoch = batch[-1].epoch
            self.batches += 1
            self.stats["examples"] += len(batch)
            return batch

    def _bad_row(self, item: _Skipped) -> None:
        e = item.error
        if item.uid not in self._bad:
            self._bad[item.uid] = {
                "uid": item.uid,
                "path": e.path,
                "row": e.row,
                "field": e.field,
                "reason": e.reason,
                "message": str(e),
            }
            self.stats["bad_rows"] += 1
            if self.cfg.skip_bad_rows or len(self._bad) <= self.max_bad_rows:
                log.warning(
                    "skipping bad row %s (%d bad rows found while reading, data.max_bad_rows=%d): %s",
                    item.uid,
                    len(self._bad),
                    self.max_bad_rows,
                    e,
                )
        if self.cfg.skip_bad_rows or len(self._bad) <= self.max_bad_rows:
            return
        if len(self._bad) == 1:
            raise e
        by_file: dict[str, list[int]] = {}
        for bad in self._bad.values():
            by_file.setdefault(bad["path"], []).append(bad["row"])
        where = "; ".join(
            f"{path}: rows {', '.join(map(str, sorted(rows)))}" for path, rows in by_file.items()
        )
        raise DataError(
            f"{len(self._bad)} rows cannot be used, more than data.max_bad_rows={self.max_bad_rows}: "
            f"{where}. The last one: {e}. Fix or remove them, or raise data.max_bad_rows "
            "(data.skip_bad_rows=True skips any number)",
            path=e.path,
            row=e.row,
            field=e.field,
            reason=e.reason,
        )

    # ---- checkpointing ----

    def _fingerprint(self) -> dict:
        return {
            "num_rows": len(self.source),
            "files": [f.name for f in self.source.files],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "train": self.train,
            "process_count": self.process_count,
        }

    def get_state(self) -> dict:
        """This process's position as plain JSON (store it in the checkpoint's host_state)."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                **self._fingerprint(),
                "process_index": self.process_index,
                "position": self._position,
                "epoch": self.epoch,
                "batches": self.batches,
                "epoch_yield": self._epoch_yield,
                "stats": dict(self.stats),
                "bad_rows": list(self._bad.values()),
            }

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` (or from `gather_states`'s {"processes": [...]}, picking ours)."""
        if "processes" in state:
            states = state["processes"]
            if len(states) != self.process_count:
                raise ValueError(
                    f"data iterator state holds {len(states)} processes but this run has "
                    f"{self.process_count}; the data order cannot be resumed"
                )
            state = states[self.process_index]
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        mine = self._fingerprint()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data iterator state was saved with {key}={state.get(key)!r} but this iterator "
                    f"has {key}={value!r}; the data order cannot be resumed"
                )
        if state.get("process_index") != self.process_index:
            raise ValueError(
                f"data iterator state belongs to process {state.get('process_index')}, this is "
                f"process {self.process_index}"
            )
        with self._lock:
            self._start(int(state["position"]))
            self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
            self._epoch_yield = int(state.get("epoch_yield", 0))
            self.stats = {**zero_stats(), **state["stats"]}
            self._bad = {bad["uid"]: bad for bad in state.get("bad_rows", [])}


def gather_states(iterator: PromptIterator) -> dict:
    """Every process's iterator state as {"processes": [state_0, ...]}, on every process.

    A collective when there are several processes (all must call it together, e.g. just before a
    checkpoint save); process 0 then writes it and each process's `set_state` picks its own entry.
    """
    return {"processes": distributed.allgather_object(iterator.get_state())}


def train_iterator(cfg, processor, **kwargs) -> PromptIterator:
    """Endless shuffled batches over cfg.train_files."""
    return PromptIterator(cfg.train_files, processor, cfg, train=True, **kwargs)


def val_iterator(cfg, processor, **kwargs) -> PromptIterator:
    """One unshuffled pass over cfg.val_files."""
    kwargs.setdefault("shuffle", False)
    return PromptIterator(cfg.val_files, processor, cfg, train=False, **kwargs)
