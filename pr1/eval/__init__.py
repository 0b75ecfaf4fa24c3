"""Evaluation on math-vision benchmarks: problems from local release files, rule-based answer checks."""

from pr1.eval.answers import check_answer, extract_answer
from pr1.eval.problems import EvalProblem, subset_values
from pr1.eval.registry import BENCHMARKS, load_benchmark

__all__ = ["BENCHMARKS", "EvalProblem", "check_answer", "extract_answer", "load_benchmark", "subset_values"]
