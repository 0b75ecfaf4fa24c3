"""The input of stage 1: (problem, image(s), answer) rows of a parquet, read through the dataset code.

Where it sits: `pipeline` asks `AnnotateSource` for the rows to distil, each row's decoded images
(sent to the teacher as PNG data URIs) and its content hash (stored in the resumable cache, so a
cached result is never applied to a row whose problem, answer or images have changed since).

The rows are opened with `pr1.data.rows.ParquetRows`, the same parser the trainer uses: the
same column checks and error messages, the same `<image>` placeholder handling, the same image
decoding (`pr1.images.load_rgb`: EXIF orientation, RGB). The teacher is therefore shown exactly the pixels
the trained policy will see, re-encoded losslessly as PNG rather than the stored bytes (the dataset
module keeps its raw-image reader private; PNG also avoids asking the server to read TIFFs or BMPs).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pr1.data.config import data_config
from pr1.data.rows import DataError, ParquetRows


@dataclasses.dataclass(frozen=True)
class SourceRow:
    index: int  # row index in the input parquet
    row_id: str  # the id column's value, else str(index): the cache key
    question: str  # the problem with its image placeholders removed
    answer: str  # ground truth, as the accuracy reward reads it


class AnnotateSource:
    """The usable rows of one parquet, in file order (the first `limit` when limit > 0).

    id_key: a column whose values identify rows; when the file has no such column the row index is
    the id. Duplicate or empty ids are a DataError naming both rows. Bad rows (empty problem, bad
    answer, placeholder/image count mismatch) are a DataError naming file, row and field, or with
    skip_bad_rows are left out and counted in `bad_rows`.
    """

    def __init__(
        self,
        path: str,
        *,
        problem_key: str = "problem",
        answer_key: str = "answer",
        images_key: str = "images",
        image_placeholder: str = "<image>",
        id_key: str = "id",
        skip_bad_rows: bool = False,
        limit: int = 0,
    ):
        cfg = data_config()
        cfg.problem_key, cfg.answer_key, cfg.images_key = problem_key, answer_key, images_key
        cfg.annotations_key = ""  # the input has none yet (an existing column is replaced on output)
        cfg.image_placeholder = image_placeholder
        cfg.skip_bad_rows = skip_bad_rows
        self.path = path
        self._rows = ParquetRows([path], cfg)
        f = self._rows.files[0]
        self.id_key = id_key if id_key and id_key in pq.read_schema(path).names else ""
        ids = (
            pq.read_table(path, columns=[self.id_key]).column(self.id_key).to_pylist()
            if self.id_key
            else None
        )
        self.bad_rows = int(self._rows.stats["skipped_bad_rows"])
        self.rows: list[SourceRow] = []
        first_of: dict[str, int] = {}
        for _, index in self._rows.rows:
            if limit and len(self.rows) >= limit:
                break
            row_id = str(index) if ids is None else ids[index]
            if ids is not None:
                if row_id is None or str(row_id).strip() == "":
                    raise DataError(
                        f"{path}: row {index}: field '{self.id_key}': empty row id",
                        path=path,
                        row=index,
                        field=self.id_key,
                        reason="bad_id",
                    )
                row_id = str(row_id)
                if row_id in first_of:
                    raise DataError(
                        f"{path}: rows {first_of[row_id]} and {index} share the id {row_id!r} in "
                        f"column '{self.id_key}'; ids must be unique (or pass --id_key=\"\" to use "
                        "row indices)",
                        path=path,
                        row=index,
                        field=self.id_key,
                        reason="bad_id",
                    )
                first_of[row_id] = index
            self.rows.append(SourceRow(index, row_id, f.questions[index], f.answers[index]))

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, row: SourceRow) -> list[np.ndarray]:
        """The row's images, decoded as the trainer decodes them (DataError naming the row if not)."""
        return self._rows.images(0, row.index)

    def read_table(self):
        """Every column of the input (for the output parquet, which keeps them all)."""
        return pq.read_table(self.path)


def content_hash(row: SourceRow, images: list[np.ndarray]) -> str:
    """sha256 over the question, the answer and the decoded pixels (with their shapes)."""
    h = hashlib.sha256()
    for text in (row.question, row.answer):
        data = text.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    for image in images:
        image = np.ascontiguousarray(image)
        h.update(repr((image.shape, str(image.dtype))).encode())
        h.update(image.tobytes())
    return h.hexdigest()


def png_data_url(image: np.ndarray) -> str:
    """An HxWx3 uint8 array as a data:image/png;base64 URL (an OpenAI image_url part's url)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
