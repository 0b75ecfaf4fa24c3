"""Parquet rows in the Perception-R1 / EasyR1 layout, read and checked: the first stage of the data.

Where it sits: `ParquetRows` reads the cheap columns of every file (problem, answer, visual
annotations), checks them, and reads every image's header (format, size, aspect ratio; no pixels
decoded), so a broken file fails before any compilation; `ParquetRows.images` decodes one row's
images on demand. The per-process iterator (`dataset.PromptIterator`) turns rows into prompts;
evaluation (`pr1.eval.parquet_problems`) and annotation (`pr1.annotate.source`) read the same rows.

Row layout (column names are config values, `config.data_config`):
  problem          question text; `<image>` placeholders are removed because the chat template puts
                   the images before the question (as Qwen2.5-VL and the Processor do)
  answer           ground truth, a string (numbers are converted)
  images           list of {bytes, path} structs, or of paths, or one such item; a relative path is
                   resolved against the parquet file's directory; bytes win over path
  visual_key_info  the visual annotations: a list of strings, or one string of
                   `<info1>..</info1><info2>..</info2>` items, or one plain string, or empty/None

Every bad field is a `DataError` naming the file, the row and the field.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pr1.data.processor import check_image_size
from pr1.data.prompts import remove_image_placeholders
from pr1.images import load_rgb

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


def row_error(path: str, row: int, field: str, reason: str, detail: str) -> DataError:
    """A DataError naming file, row and field, with its BAD_ROW_REASONS entry."""
    return DataError(
        f"{path}: row {row}: field '{field}': {detail}", path=path, row=row, field=field, reason=reason
    )


def zero_stats() -> dict:
    """Zeroed row counters (`ParquetRows.stats`, `PromptIterator.stats`)."""
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


def count_skip(stats: dict, reason: str) -> None:
    """Count one left-out row: a BAD_ROW_REASONS entry, or "too_long" (a filtered prompt)."""
    if reason == "too_long":
        stats["filtered_too_long"] += 1
    else:
        stats["skipped_bad_rows"] += 1
        stats[f"bad_rows/{reason}"] = stats.get(f"bad_rows/{reason}", 0) + 1


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
        self.stats = zero_stats()
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
                    raise row_error(
                        path,
                        row,
                        cfg.problem_key,
                        "empty_problem",
                        f"expected text, got {type(problem).__name__}",
                    )
                question = remove_image_placeholders(problem, placeholder)
                if not question:
                    raise row_error(path, row, cfg.problem_key, "empty_problem", "empty problem")
                n_slots = problem.count(placeholder) if placeholder else 0
                if n_slots and n_slots != counts[row]:
                    raise row_error(
                        path,
                        row,
                        cfg.problem_key,
                        "image_count_mismatch",
                        f"{n_slots} {placeholder} placeholders but {counts[row]} images in '{images_key}'",
                    )
                answer = _answer_text(answers[row])
                if answer is None:
                    raise row_error(
                        path,
                        row,
                        cfg.answer_key,
                        "bad_answer",
                        f"expected a non-empty string or a number, got {answers[row]!r:.80}",
                    )
                try:
                    notes = parse_annotations(annotations[row])
                except ValueError as e:
                    raise row_error(path, row, wanted["annotations_key"], "bad_annotations", str(e)) from None
                if len(notes) > int(cfg.max_annotations):
                    raise row_error(
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
                count_skip(self.stats, e.reason)
                continue
            f.questions[row], f.answers[row], f.annotations[row] = question, answer, notes
            self.rows.append((fi, row))
        return f

    def _check_headers(self, path: str, row: int, cell) -> None:
        field = self.cfg.images_key
        try:
            items = _image_items(cell)
        except ValueError as e:
            raise row_error(path, row, field, "bad_images", str(e)) from None
        for k, item in enumerate(items):
            item = _resolve(path, item)
            try:
                height, width = image_header_size(item)
            except FileNotFoundError:
                raise row_error(
                    path, row, f"{field}[{k}]", "missing_image", f"image file {item} not found"
                ) from None
            except ValueError as e:
                raise row_error(
                    path, row, f"{field}[{k}]", "undecodable_image", f"cannot decode: {e}"
                ) from None
            try:
                check_image_size(height, width)
            except ValueError as e:
                raise row_error(path, row, f"{field}[{k}]", "unprocessable", str(e)) from None

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
            raise row_error(f.path, row, field, "bad_images", str(e)) from None
        out = []
        for k, item in enumerate(items):
            item = _resolve(f.path, item)
            try:
                out.append(load_rgb(item))
            except FileNotFoundError:
                raise row_error(
                    f.path, row, f"{field}[{k}]", "missing_image", f"image file {item} not found"
                ) from None
            except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise row_error(
                    f.path, row, f"{field}[{k}]", "undecodable_image", f"cannot decode: {e}"
                ) from None
        return out
