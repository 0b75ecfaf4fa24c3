"""Reading released benchmark files: rows of JSON / JSONL / parquet, their fields, their images.

Where it sits: the per-benchmark loaders (mathvista.py, mathverse.py, mathvision.py, wemath.py)
read each release with these helpers and build `EvalProblem`s; `registry.load_benchmark`
dispatches to them. Releases are used as distributed: GitHub-style JSON with an images directory,
or Hugging Face parquet with images embedded as {bytes, path} structs. Images are returned as the
encoded file bytes, never decoded here (the runner's processor does that).

Errors are `DataError`s naming the file, the row (0-based position in the file), the release's id
and the field, so a broken download can be found and fixed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import pyarrow.parquet as pq

from pr1.data.rows import DataError
from pr1.eval.problems import as_text, row_error


@dataclasses.dataclass
class Row:
    """One record of a release file with field access that fails with an actionable message."""

    path: str  # the release file
    index: int  # 0-based position in the file
    data: dict
    rid: str | None = None  # the release's id, once read (named in messages)

    def error(self, field: str, detail: str) -> DataError:
        return row_error(self.path, self.index, field, detail, rid=self.rid)

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def text(self, field: str, *, required: bool = True) -> str | None:
        """The field as stripped text (numbers converted); missing/null/empty is an error if
        required, else None."""
        value = self.data.get(field)
        if isinstance(value, (list, tuple, dict, bytes)):
            raise self.error(field, f"expected text, got a {type(value).__name__}")
        text = as_text(value)
        if text is None and required:
            raise self.error(
                field,
                "empty" if field in self.data else f"missing; the record has fields {sorted(self.data)}",
            )
        return text

    def record(self, field: str) -> dict:
        """A nested record (MathVista's and MathVerse's `metadata`)."""
        value = self.data.get(field)
        if not isinstance(value, dict):
            raise self.error(field, f"expected a record of fields, got {type(value).__name__}")
        return value

    def texts(self, field: str, *, required: bool = True) -> list[str] | None:
        """A list of strings (MathVista choices, MathVision options); null -> None."""
        value = self.data.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing")
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise self.error(field, f"expected a list of strings, got {value!r:.80}")
        return [str(v).strip() for v in value]

    def image_file(self, field: str, relpath: str, roots: list[str]) -> bytes:
        """The bytes of image `relpath`, looked up under each root in turn."""
        candidates = [relpath] if os.path.isabs(relpath) else [os.path.join(r, relpath) for r in roots]
        for c in candidates:
            if os.path.isfile(c):
                with open(c, "rb") as f:
                    return f.read()
        raise self.error(field, f"image file {relpath!r} not found; looked for {candidates}")

    def image_cell(self, field: str, value: Any, roots: list[str]) -> bytes:
        """An image cell: a {bytes, path} struct (bytes win), raw bytes, or a path."""
        return image_from_cell(self.path, self.index, field, value, roots, rid=self.rid)


def image_from_cell(
    path: str, row: int, field: str, value: Any, roots: list[str], *, rid: str | None = None
) -> bytes:
    """Encoded image bytes from a parquet/JSON image cell; a path is looked up under `roots`."""
    r = Row(path, row, {}, rid)
    if isinstance(value, dict):
        data, rel = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        if rel:
            return r.image_file(field, str(rel), roots)
        raise r.error(field, "image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        return r.image_file(field, value.strip(), roots)
    raise r.error(field, f"expected an image ({{bytes, path}} struct, bytes or a path), got {value!r:.60}")


def iter_rows(path: str, *, limit: int | None = None) -> Iterator[Row]:
    """Records of a .json (a list, or a dict of id -> record), .jsonl or .parquet release file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        yield from _parquet_rows(path, limit)
        return
    if ext not in (".json", ".jsonl"):
        raise DataError(
            f"{path}: unsupported file type {ext!r}; expected .json, .jsonl or .parquet", path=path
        )
    try:
        with open(path, encoding="utf-8") as f:
            if ext == ".jsonl":
                records = [(i, line) for i, line in enumerate(f) if line.strip()]
                items = []
                for i, line in records:
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path}: line {i + 1}: not valid JSON: {e}", path=path, row=i
                        ) from None
            else:
                items = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}", path=path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}", path=path) from None
    if isinstance(items, dict):
        # MathVista's testmini.json maps pid -> record; the key is kept for records without their own id.
        items = [dict(v, _key=k) if isinstance(v, dict) else v for k, v in items.items()]
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of records, got {type(items).__name__}", path=path)
    for i, item in enumerate(items[:limit] if limit is not None else items):
        if not isinstance(item, dict):
            raise DataError(
                f"{path}: row {i}: expected a record, got {type(item).__name__}", path=path, row=i
            )
        yield Row(path, i, item)


def _parquet_rows(path: str, limit: int | None) -> Iterator[Row]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise DataError(f"{path}: not a readable parquet file: {e}", path=path) from None
    i = 0
    # Small batches: a row of image bytes can be megabytes, and `limit` should not read the whole file.
    for batch in pf.iter_batches(batch_size=16):
        for item in batch.to_pylist():
            if limit is not None and i >= limit:
                return
            yield Row(path, i, item)
            i += 1


def file_roots(path: str, *subdirs: str) -> list[str]:
    """Directories an image path of release file `path` may be relative to: the file's directory,
    its parent (MATH-V keeps data/test.jsonl beside images/), and `subdirs` of both."""
    here = os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(here)
    roots = [here, parent]
    roots += [os.path.join(d, s) for s in subdirs for d in (here, parent)]
    return list(dict.fromkeys(roots))


def collect(files: list[str], make, *, limit: int | None, id_field: str) -> list:
    """`make(row)` for the records of `files` in order, at most `limit`, ids checked unique."""
    out, seen = [], {}
    for f in files:
        for row in iter_rows(f, limit=None if limit is None else limit - len(out)):
            problem = make(row)
            if problem.id in seen:
                raise row.error(id_field, f"id {problem.id!r} repeats {seen[problem.id]}; ids must be unique")
            seen[problem.id] = f"{row.path} row {row.index}"
            out.append(problem)
        if limit is not None and len(out) >= limit:
            break
    return out
