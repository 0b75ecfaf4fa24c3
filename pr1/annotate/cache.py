"""The resumable record of stage 1: one JSON line per finished step of a row, fsynced as written.

Where it sits: `pipeline` appends a record when a row is finished (kind "done": kept or filtered)
and, before extraction, when the teacher has produced a correct chain of thought (kind "cot"), so
that a restart neither asks the teacher again for a finished row nor throws away an expensive
correct CoT because the extractor was down. The output parquet is written from these records.

A crash can tear only the last line (records are appended whole and fsynced one by one): a last
line that is not JSON is dropped with a warning and cut from the file, so the next append starts on
a fresh line. An unreadable line anywhere else means the file was edited or is not ours: an error
naming the file and line. Rows that failed (a service kept failing) have no record, so the next run
tries them again.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

KINDS = ("cot", "done")


class CacheError(ValueError):
    """An unusable cache file or a cached row that no longer matches the input."""


class RowCache:
    """Records by kind and row id (the last one wins). Open it, read `done`/`cot`, `append`, `close`."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[str, dict] = {}
        self.cot: dict[str, dict] = {}
        self.torn_lines = 0
        self._load()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._file = open(path, "ab")

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        offset = 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            last = number == len(lines)  # the text after the final newline ("" when the file is whole)
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or record.get("kind") not in KINDS or "row_id" not in record:
                    raise ValueError("not a cache record")
            except ValueError as e:
                if last:
                    log.warning(
                        "%s: line %d is incomplete (the run was killed while writing it); ignoring it",
                        self.path,
                        number,
                    )
                    self.torn_lines += 1
                    with open(self.path, "r+b") as f:
                        f.truncate(start)
                    break
                raise CacheError(
                    f"{self.path}: line {number} is not a stage-1 cache record ({e}); this file "
                    "was not written by pr1.annotate or was edited. Move it away or pass "
                    "--cache=OTHER"
                ) from None
            if last:
                # A complete record without its newline: keep it, and end the line before appending.
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            (self.done if record["kind"] == "done" else self.cot)[str(record["row_id"])] = record

    def append(self, record: dict) -> None:
        """Writes one record durably (flush + fsync) before returning."""
        if record.get("kind") not in KINDS:
            raise ValueError(f"cache record kind must be one of {KINDS}, got {record.get('kind')!r}")
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        (self.done if record["kind"] == "done" else self.cot)[str(record["row_id"])] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
