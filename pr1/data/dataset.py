"""Parquet rows in the Perception-R1 / EasyR1 layout → batches of rollout prompts, with grain.

Data flow: `open_parquet` reads the cheap columns of every file (problem, answer, visual annotations)
and checks them, and reads every image's header (format, size, aspect ratio; no pixels decoded), so
a broken file fails before any compilation; `PromptIterator` shuffles row indices
with grain (seeded, reshuffled every epoch), gives each process its own share of every epoch, and in
grain's prefetch threads decodes the images and builds each `Prompt` (chat template, image patches)
lazily, one row at a time. The training loop takes `prompts_per_step` `Example`s per step, rolls out n
responses for each on this process (so a GRPO group never crosses hosts), and stores
`get_state()` in its checkpoint; `set_state` resumes at exactly the next batch.

An image whose header is fine but whose pixels do not decode (a truncated file) is only found when
its row is read during the run. Such a row is skipped, logged by name and counted (`bad_rows`),
up to `data.max_bad_rows` distinct rows; one more stops the run with an error naming every file
and row. The rows found bad are part of the iterator state, so a resumed run skips them too and
never replays into the same crash.

Row layout (column names are config values):
  problem          question text; `<image>` placeholders are removed because the chat template puts
                   the images before the question (as Qwen2.5-VL and the Processor do)
  answer           ground truth, a string (numbers are converted)
  images           list of {bytes, path} structs, or of paths, or one such item; a relative path is
                   resolved against the parquet file's directory; bytes win over path
  visual_key_info  the visual annotations: a list of strings, or one string of
                   `<info1>..</info1><info2>..</info2>` items, or one plain string, or empty/None
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
import threading
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pr1.data.processor import check_image_size
from pr1.images import load_rgb
from pr1.models.generation import Prompt

log = logging.getLogger(__name__)

# The paper's instruction (reference/paper.md, "Prompt"), appended to the user turn.
FORMAT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags, and the answer process "
    "MUST BE enclosed within <answer> </answer> tags. The final answer MUST BE put in \\boxed{} in "
    "<answer> </answer> tags."
)

STATE_VERSION = 1
# Per-reason counter keys in `PromptIterator.stats` are "bad_rows/<reason>".
BAD_ROW_REASONS = (
    "empty_problem",
    "bad_answer",
    "bad_annotations",
    "bad_images",
    "image_count_mismatch",
    "missing_image",
    "undecodable_image",
    "unprocessable",
)


class DataError(ValueError):
    """A row or file that cannot become a prompt; the message names the file, row and field."""

    def __init__(
        self, message: str, *, path: str = "", row: int | None = None, field: str = "", reason: str = ""
    ):
        super().__init__(message)
        self.path, self.row, self.field, self.reason = path, row, field, reason


def _row_error(path: str, row: int, field: str, reason: str, detail: str) -> DataError:
    return DataError(
        f"{path}: row {row}: field '{field}': {detail}", path=path, row=row, field=field, reason=reason
    )


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


# ---- row fields -------------------------------------------------------------------------------

_INFO_TAG = re.compile(r"<info(\d+)>(.*?)</info\1>", re.DOTALL)


def parse_annotations(value: Any) -> list[str]:
    """Visual annotations in any accepted form → a list of non-empty strings.

    Accepts None (no annotations), a list/tuple of strings, a string of `<info1>..</info1>` items
    (in order of appearance, separated by whitespace/commas at most), a JSON list of strings, or a
    plain string (one annotation). Anything else (a dict, a number, a list holding non-strings, text
    between `<infoK>` items) raises ValueError.
    """
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        out = []
        for k, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"annotation list item {k} is a {type(item).__name__}, not a string")
            if item.strip():
                out.append(item.strip())
        return out
    if not isinstance(value, str):
        raise ValueError(f"annotations must be a list of strings or a string, got a {type(value).__name__}")
    text = value.strip()
    if not text:
        return []
    if text.startswith("[") and text.endswith("]"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            return parse_annotations(items)
    if re.search(r"</?info\d+>", text):
        items = [m.group(2).strip() for m in _INFO_TAG.finditer(text)]
        leftover = _INFO_TAG.sub("", text)
        if re.sub(r"[\s,;]", "", leftover):
            raise ValueError(
                f"text outside <infoK>..</infoK> items (or an unclosed tag): {leftover.strip()[:80]!r}"
            )
        return [item for item in items if item]
    return [text]


def remove_image_placeholders(problem: str, placeholder: str = "<image>") -> str:
    """The question without its image placeholders (the images go before it in the chat template)."""
    if not placeholder:
        return problem.strip()
    text = problem.replace(placeholder, " ")
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def with_instruction(question: str, instruction: str) -> str:
    """`question + " " + instruction`: EasyR1's `{{ content | trim }} <instruction>`."""
    return f"{question.strip()} {instruction}" if instruction else question.strip()


def _answer_text(value: Any) -> str | None:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _image_items(value: Any) -> list:
    """A row's images cell → list of encoded bytes or path strings (raises ValueError on other forms)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data is not None:
                item = data
            elif path:
                item = path
            else:
                raise ValueError(f"image {k} has neither bytes nor path")
        if isinstance(item, (bytes, bytearray, memoryview)):
            out.append(bytes(item))
        elif isinstance(item, str) and item:
            out.append(item)
        else:
            raise ValueError(
                f"image {k} is a {type(item).__name__}; expected {{bytes, path}}, bytes or a path"
            )
    return out


def _image_column_ok(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    if pa.types.is_struct(t):
        return any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields))
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_null(t)
    )


def _resolve(parquet_path: str, item):
    """A relative image path is relative to the parquet file's directory."""
    if isinstance(item, str) and not os.path.isabs(item):
        return os.path.join(os.path.dirname(os.path.abspath(parquet_path)), item)
    return item


# PNG, GIF and BMP headers sit in the first bytes; a JPEG's size may follow large EXIF/ICC blocks,
# so a prefix that does not open is retried with the whole encoded image.
_HEADER_PREFIX = 1 << 16


def image_header_size(item) -> tuple[int, int]:
    """(height, width) of encoded image bytes or an image file, from its header alone: PIL's open
    is lazy and decodes no pixels. FileNotFoundError; ValueError when it is not an image PIL knows."""
    if isinstance(item, str) and not os.path.isfile(item):
        raise FileNotFoundError(f"image file {item} not found")
    sources = (
        [item]
        if isinstance(item, str)
        else [io.BytesIO(item[:_HEADER_PREFIX])] + ([io.BytesIO(item)] if len(item) > _HEADER_PREFIX else [])
    )
    for k, source in enumerate(sources):
        try:
            with Image.open(source) as image:
                width, height = image.size
            return height, width
        except Image.DecompressionBombError as e:
            raise ValueError(str(e)) from None
        except (OSError, SyntaxError, ValueError) as e:
            if k == len(sources) - 1:
                raise ValueError(f"not an image: {e}") from None
    raise AssertionError("unreachable")


def _iter_cells(column: pa.ChunkedArray, block: int = 256):
    # Python values a block of rows at a time: the whole images column never sits in Python at once.
    for chunk in column.chunks:
        for start in range(0, len(chunk), block):
            yield from chunk.slice(start, block).to_pylist()


# ---- files -------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _File:
    path: str
    name: str  # used in uids: the basename, or the path where basenames collide
    questions: list  # problem without placeholders (None for rows skipped at open)
    answers: list
    annotations: list
    images: pa.ChunkedArray | None


class ParquetRows:
    """Every usable row of some parquet files, checked at open; rows are (file index, row index).

    A missing column or an images column of an unusable type is a DataError naming file and column.
    A bad cheap field (empty problem, bad answer, annotations in an unknown form, more `<image>`
    placeholders than images) or image header (missing file, not an image, a size the processor
    refuses) is a DataError naming file, row and field, or, with skip_bad_rows, leaves the row out
    and is counted in `stats`. Image pixels are decoded per row on demand.
    """

    def __init__(self, files: Sequence[str] | str, cfg, *, skip_bad_rows: bool | None = None):
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise DataError("no parquet files given")
        self.cfg = cfg
        self.skip_bad_rows = bool(cfg.skip_bad_rows if skip_bad_rows is None else skip_bad_rows)
        self.stats = _zero_stats()
        self.files: list[_File] = []
        self.rows: list[tuple[int, int]] = []
        basenames = [os.path.basename(f) for f in files]
        for fi, path in enumerate(files):
            name = basenames[fi] if basenames.count(basenames[fi]) == 1 else path
            self.files.append(self._open(fi, os.fspath(path), name))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.rows[i]

    def _open(self, fi: int, path: str, name: str) -> _File:
        cfg = self.cfg
        if not os.path.isfile(path):
            raise DataError(f"{path}: parquet file not found", path=path)
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}", path=path) from None
        wanted = {
            "problem_key": cfg.problem_key,
            "answer_key": cfg.answer_key,
            "images_key": cfg.images_key or None,
            "annotations_key": cfg.annotations_key or None,
        }
        for key, column in wanted.items():
            if column is not None and column not in schema.names:
                raise DataError(
                    f"{path}: no column '{column}' (config data.{key}); the file has columns {schema.names}",
                    path=path,
                    field=column,
                )
        images_key = wanted["images_key"]
        if images_key is not None and not _image_column_ok(schema.field(images_key).type):
            raise DataError(
                f"{path}: column '{images_key}' has type {schema.field(images_key).type}; expected "
                "a list of {bytes, path} structs, of paths, or one such item",
                path=path,
                field=images_key,
            )
        columns = [c for c in wanted.values() if c is not None]
        # memory_map: the images column stays in (mapped) Arrow memory until a row asks for it.
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)), memory_map=True)
        problems = table.column(cfg.problem_key).to_pylist()
        answers = table.column(cfg.answer_key).to_pylist()
        annotations = (
            table.column(wanted["annotations_key"]).to_pylist()
            if wanted["annotations_key"]
            else [None] * table.num_rows
        )
        images = table.column(images_key) if images_key else None
        counts = self._image_counts(images, table.num_rows)
        cells = _iter_cells(images) if images is not None else None

        f = _File(
            path, name, [None] * table.num_rows, [None] * table.num_rows, [None] * table.num_rows, images
        )
        placeholder = cfg.image_placeholder
        for row in range(table.num_rows):
            cell = next(cells) if cells is not None else None
            try:
                problem = problems[row]
                if not isinstance(problem, str):
                    raise _row_error(
                        path,
                        row,
                        cfg.problem_key,
                        "empty_problem",
                        f"expected text, got {type(problem).__name__}",
                    )
                question = remove_image_placeholders(problem, placeholder)
                if not question:
                    raise _row_error(path, row, cfg.problem_key, "empty_problem", "empty problem")
                n_slots = problem.count(placeholder) if placeholder else 0
                if n_slots and n_slots != counts[row]:
                    raise _row_error(
                        path,
                        row,
                        cfg.problem_key,
                        "image_count_mismatch",
                        f"{n_slots} {placeholder} placeholders but {counts[row]} images in '{images_key}'",
                    )
                answer = _answer_text(answers[row])
                if answer is None:
                    raise _row_error(
                        path,
                        row,
                        cfg.answer_key,
                        "bad_answer",
                        f"expected a non-empty string or a number, got {answers[row]!r:.80}",
                    )
                try:
                    notes = parse_annotations(annotations[row])
                except ValueError as e:
                    raise _row_error(
                        path, row, wanted["annotations_key"], "bad_annotations", str(e)
                    ) from None
                if len(notes) > int(cfg.max_annotations):
                    raise _row_error(
                        path,
                        row,
                        wanted["annotations_key"],
                        "bad_annotations",
                        f"{len(notes)} visual annotations, more than data.max_annotations="
                        f"{cfg.max_annotations} (the judge prompt lists every one)",
                    )
                if cell is not None:
                    self._check_headers(path, row, cell)
            except DataError as e:
                if not self.skip_bad_rows:
                    raise
                _count(self.stats, e.reason)
                continue
            f.questions[row], f.answers[row], f.annotations[row] = question, answer, notes
            self.rows.append((fi, row))
        return f

    def _check_headers(self, path: str, row: int, cell) -> None:
        field = self.cfg.images_key
        try:
            items = _image_items(cell)
        except ValueError as e:
            raise _row_error(path, row, field, "bad_images", str(e)) from None
        for k, item in enumerate(items):
            item = _resolve(path, item)
            try:
                height, width = image_header_size(item)
            except FileNotFoundError:
                raise _row_error(
                    path, row, f"{field}[{k}]", "missing_image", f"image file {item} not found"
                ) from None
            except ValueError as e:
                raise _row_error(
                    path, row, f"{field}[{k}]", "undecodable_image", f"cannot decode: {e}"
                ) from None
            try:
                check_image_size(height, width)
            except ValueError as e:
                raise _row_error(path, row, f"{field}[{k}]", "unprocessable", str(e)) from None

    @staticmethod
    def _image_counts(images: pa.ChunkedArray | None, num_rows: int) -> list[int]:
        if images is None:
            return [0] * num_rows
        t = images.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return [int(n or 0) for n in pc.list_value_length(images).to_pylist()]
        return [1 if ok else 0 for ok in pc.is_valid(images).to_pylist()]

    def images(self, fi: int, row: int) -> list[np.ndarray]:
        """Row's images decoded to HxWx3 uint8 (DataError naming file, row and field on failure)."""
        f = self.files[fi]
        if f.images is None:
            return []
        field = self.cfg.images_key
        try:
            items = _image_items(f.images[row].as_py())
        except ValueError as e:
            raise _row_error(f.path, row, field, "bad_images", str(e)) from None
        out = []
        for k, item in enumerate(items):
            item = _resolve(f.path, item)
            try:
                out.append(load_rgb(item))
            except FileNotFoundError:
                raise _row_error(
                    f.path, row, f"{field}[{k}]", "missing_image", f"image file {item} not found"
                ) from None
            except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise _row_error(
                    f.path, row, f"{field}[{k}]", "undecodable_image", f"cannot decode: {e}"
                ) from None
        return out


def open_parquet(files: Sequence[str] | str, cfg) -> ParquetRows:
    return ParquetRows(files, cfg)


# ---- examples and the iterator -----------------------------------------------------------------


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


def _zero_stats() -> dict:
    # bad_rows: distinct rows left out as bad (at open and while reading); skipped_bad_rows and
    # bad_rows/<reason> count every meeting (a bad image once per epoch).
    stats = {
        "bad_rows": 0,
        "skipped_bad_rows": 0,
        "filtered_too_long": 0,
        "dropped_remainder": 0,
        "examples": 0,
    }
    stats.update({f"bad_rows/{r}": 0 for r in BAD_ROW_REASONS})
    return stats


def _count(stats: dict, reason: str) -> None:
    if reason == "too_long":
        stats["filtered_too_long"] += 1
    else:
        stats["skipped_bad_rows"] += 1
        stats[f"bad_rows/{reason}"] = stats.get(f"bad_rows/{reason}", 0) + 1


def _with_pixel_limits(processor, min_pixels, max_pixels):
    if min_pixels is None and max_pixels is None:
        return processor
    lo = processor.min_pixels if min_pixels is None else int(min_pixels)
    hi = processor.max_pixels if max_pixels is None else int(max_pixels)
    if not 0 < lo <= hi:
        raise ValueError(f"config data.min_pixels/max_pixels: need 0 < min <= max, got {lo}, {hi}")
    processor = copy.copy(processor)
    processor.min_pixels, processor.max_pixels = lo, hi
    return processor


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
        self.processor = _with_pixel_limits(processor, cfg.min_pixels, cfg.max_pixels)
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
                raise _row_error(f.path, row, self.cfg.problem_key, "unprocessable", str(e)) from None
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
                    _count(self.stats, item.reason)
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
            self.stats = {**_zero_stats(), **state["stats"]}
            self._bad = {bad["uid"]: bad for bad in state.get("bad_rows", [])}


def gather_states(iterator: PromptIterator) -> dict:
    """Every process's iterator state as {"processes": [state_0, ...]}, on every process.

    A collective when there are several processes (all must call it together, e.g. just before a
    checkpoint save); process 0 then writes it and each process's `set_state` picks its own entry.
    """
    state = iterator.get_state()
    if iterator.process_count == 1:
        return {"processes": [state]}
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
    return {"processes": [json.loads(every[p, : lengths[p]].tobytes()) for p in range(len(lengths))]}


def train_iterator(cfg, processor, **kwargs) -> PromptIterator:
    """Endless shuffled batches over cfg.train_files."""
    return PromptIterator(cfg.train_files, processor, cfg, train=True, **kwargs)


def val_iterator(cfg, processor, **kwargs) -> PromptIterator:
    """One unshuffled pass over cfg.val_files."""
    kwargs.setdefault("shuffle", False)
    return PromptIterator(cfg.val_files, processor, cfg, train=False, **kwargs)
