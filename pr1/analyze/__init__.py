"""Analyses of evaluation records: `python -m pr1.analyze mcnemar A.jsonl B.jsonl ...`.

records.py  load `pr1.eval` JSONL records, pair two runs by (benchmark, id), filter and sample
labels.py   per-problem labels: answer accuracy, hand perception labels, or judged perception
report.py   the McNemar 2x2 table and exact p-value (`pr1.stats`), as text or JSON
"""

from pr1.analyze.labels import (
    LabelsFile,
    PerceptionLabels,
    accuracy_labels,
    load_annotations,
    load_labels,
    perception_labels,
    save_labels,
)
from pr1.analyze.records import AnalysisError, Pairing, Record, load_records, pair_records, parse_subsets
from pr1.analyze.report import McNemarReport, mcnemar_from_files, mcnemar_report

__all__ = [
    "AnalysisError",
    "LabelsFile",
    "McNemarReport",
    "Pairing",
    "PerceptionLabels",
    "Record",
    "accuracy_labels",
    "load_annotations",
    "load_labels",
    "load_records",
    "mcnemar_from_files",
    "mcnemar_report",
    "pair_records",
    "parse_subsets",
    "perception_labels",
    "save_labels",
]
