"""The benchmarks `python -m pr1.eval` knows, by name, and `load_benchmark` that dispatches to them.

Each released benchmark has its own loader module (mathvista.py, mathverse.py, mathvision.py,
wemath.py: `load(path, limit)` over the release files, read with `release_files`); our own
training layout is `parquet_problems`. Adding a benchmark is one import and one entry here.
"""

from __future__ import annotations

from typing import Callable

from pr1.eval import mathverse, mathvision, mathvista, wemath
from pr1.eval.parquet_problems import PARQUET, load_parquet_problems
from pr1.eval.problems import EvalProblem, check_limit

# Released benchmarks: name -> the loader `load(path, *, limit)` of its module.
BENCHMARKS: dict[str, Callable[..., list[EvalProblem]]] = {
    "mathvista": mathvista.load,
    "mathverse": mathverse.load,
    "mathvision": mathvision.load,
    "wemath": wemath.load,
}


def load_benchmark(name: str, path: str, *, limit: int | None = None) -> list[EvalProblem]:
    """Problems of benchmark `name` from local files at `path` (a file or a directory).

    name: "mathvista" (testmini), "mathverse" (testmini), "mathvision" (test), "wemath" (testmini),
    or "parquet" / "parquet:<name>" for our own training layout. JSON vs parquet is told from the
    file names; a directory is searched for the release's files (see docs/eval_data.md).
    limit: the first `limit` problems in file order (None: all).
    """
    check_limit(limit)
    key = name.strip().lower()
    if key == PARQUET or key.startswith(PARQUET + ":"):
        label = name.strip()[len(PARQUET) + 1 :] or None
        return load_parquet_problems(path, label, limit=limit)
    if key not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, "
            f"{PARQUET} or {PARQUET}:<name> (our own parquet layout)"
        )
    return BENCHMARKS[key](path, limit=limit)
