"""The McNemar result of two labelled models over their paired problems, as text or JSON.

Where it sits: last step of `python -m pr1.analyze mcnemar`: `records.pair_records` gives the
paired problems, `labels.py` a label per problem and model, and `mcnemar_report` counts the 2x2
table (`pr1.stats.contingency`, A = rows, B = columns) and its exact p-value. Pairs dropped on the
way (a side without a label, with --skip_failed) are counted and named, like the unpaired problems.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from pr1.analyze import labels as labels_lib
from pr1.analyze.records import AnalysisError, Key, Pairing, load_records, pair_records, problem_name
from pr1.stats import McNemarTable, contingency

_SHOW = 10  # names printed per list in the text report (the JSON has all of them)


@dataclasses.dataclass
class McNemarReport:
    label: str
    file_a: str
    file_b: str
    models_a: list[str]
    models_b: list[str]
    table: McNemarTable
    problems: list[str]  # the problems counted in the table
    population: int
    sample: int | None
    seed: int | None
    only_a: list[str]
    only_b: list[str]
    skipped: list[dict]  # {"problem", "side", "reason"}
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(
            label=self.label,
            file_a=self.file_a,
            file_b=self.file_b,
            models_a=self.models_a,
            models_b=self.models_b,
            **self.table.as_dict(),
            population=self.population,
            sample=self.sample,
            seed=self.seed,
            problems=self.problems,
            unpaired=dict(only_a=self.only_a, only_b=self.only_b),
            skipped=self.skipped,
            notes=self.notes,
        )

    def format(self) -> str:
        t = self.table
        models = lambda ms: f" (model {', '.join(ms)})" if ms else ""  # noqa: E731
        drawn = (
            f", a random sample of {self.sample} of {self.population} (seed {self.seed})"
            if self.sample is not None
            else ""
        )
        width = max(len(str(v)) for v in (t.a, t.b, t.c, t.d, "B correct"))
        lines = [
            f"McNemar exact test on {self.label} labels",
            f"  A: {self.file_a}{models(self.models_a)}",
            f"  B: {self.file_b}{models(self.models_b)}",
            f"paired problems: {t.n}{drawn}",
            f"  {'':<10} {'B correct':>{width}} {'B wrong':>{width}}",
            f"  {'A correct':<10} {t.a:>{width}} {t.b:>{width}}",
            f"  {'A wrong':<10} {t.c:>{width}} {t.d:>{width}}",
            f"b = {t.b} (A correct, B wrong)   c = {t.c} (A wrong, B correct)",
            f"p = {t.p:.6g} (two-sided exact binomial: min(1, 2 P(X <= min(b, c))), X ~ Bin(b + c, 1/2))",
            f"unpaired: {len(self.only_a)} only in A{_list(self.only_a)}; "
            f"{len(self.only_b)} only in B{_list(self.only_b)}",
        ]
        if self.skipped:
            pairs = sorted({s["problem"] for s in self.skipped})
            lines.append(f"skipped pairs: {len(pairs)} (--skip_failed)")
            lines += [f"  {s['problem']} [{s['side']}]: {s['reason']}" for s in self.skipped[:_SHOW]]
            if len(self.skipped) > _SHOW:
                lines.append(f"  ... and {len(self.skipped) - _SHOW} more (see --json)")
        lines += self.notes
        return "\n".join(lines)


def _list(names: Sequence[str]) -> str:
    if not names:
        return ""
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return f" ({', '.join(names[:_SHOW])}{more})"


def mcnemar_report(
    pairing: Pairing,
    labels_a: Mapping[Key, bool],
    labels_b: Mapping[Key, bool],
    *,
    label: str,
    file_a: str = "A",
    file_b: str = "B",
    skipped_a: Mapping[Key, str] | None = None,
    skipped_b: Mapping[Key, str] | None = None,
    notes: Sequence[str] = (),
) -> McNemarReport:
    """The table over the paired problems labelled on both sides.

    A pair missing a label on a side is dropped only if that side's `skipped_*` says why (and is
    then reported); a label missing without a reason is an error, never a silent drop.
    """
    skipped_a, skipped_b = dict(skipped_a or {}), dict(skipped_b or {})
    used, skipped = [], []
    for ra, _ in pairing.pairs:
        key = ra.key
        reasons = [(side, why[key]) for side, why in (("A", skipped_a), ("B", skipped_b)) if key in why]
        if reasons:
            skipped += [dict(problem=ra.name, side=side, reason=reason) for side, reason in reasons]
            continue
        for side, labels in (("A", labels_a), ("B", labels_b)):
            if key not in labels:
                raise AnalysisError(f"no {label} label of {side} for {ra.name}")
        used.append(key)
    table = contingency([labels_a[k] for k in used], [labels_b[k] for k in used])

    def models(side: int) -> list[str]:
        return sorted(
            {str(p[side].data["model"]) for p in pairing.pairs if p[side].data.get("model") is not None}
        )

    return McNemarReport(
        label=label,
        file_a=file_a,
        file_b=file_b,
        models_a=models(0),
        models_b=models(1),
        table=table,
        problems=[problem_name(k) for k in used],
        population=pairing.population,
        sample=pairing.sample,
        seed=pairing.seed,
        only_a=[r.name for r in pairing.only_a],
        only_b=[r.name for r in pairing.only_b],
        skipped=skipped,
        notes=list(notes),
    )


def mcnemar_from_files(
    path_a: str,
    path_b: str,
    *,
    label: str,
    benchmark: str | None = None,
    subsets: Mapping[str, str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    labels_files: Sequence[str] | None = None,
    judge=None,
    annotations: Mapping[str, Sequence[str]] | None = None,
    skip_failed: bool = False,
    save_labels: Sequence[str] | None = None,
    progress=None,
) -> McNemarReport:
    """The whole analysis: load, pair and filter (and sample), label each side, count and test.

    label "accuracy" uses the records' `correct`; "perception" uses `labels_files` (A's, B's) or,
    failing those, `judge` (a `pr1.rewards.judge.Judge`). `save_labels` (A's path, B's path)
    writes the perception labels used, in a form `labels_files` reads back.
    """
    if label not in ("accuracy", "perception"):
        raise AnalysisError(f"--label must be accuracy or perception, got {label!r}")
    if label == "perception" and (labels_files is None) == (judge is None):
        raise AnalysisError(
            "--label perception needs exactly one of --labels LABELS_A,LABELS_B, --judge_url URL "
            "or --judge lexical"
        )
    if label == "accuracy" and (labels_files or judge or save_labels):
        raise AnalysisError("--labels, --judge* and --save_labels apply to --label perception only")
    records_a, records_b = load_records(path_a), load_records(path_b)
    pairing = pair_records(
        records_a, records_b, benchmark=benchmark, subsets=subsets, sample=sample, seed=seed
    )
    if not pairing.pairs:
        raise AnalysisError(
            f"no problem is in both {path_a} ({len(records_a)} records) and {path_b} "
            f"({len(records_b)} records) after the filters; are they runs of the same benchmark?"
        )
    sides = ([a for a, _ in pairing.pairs], [b for _, b in pairing.pairs])
    skipped: list[dict] = [{}, {}]
    details: list[dict] = [{}, {}]
    notes = []
    if label == "accuracy":
        labels = [labels_lib.accuracy_labels(side) for side in sides]
        source = "correct"
    elif labels_files is not None:
        keys = [r.key for r in sides[0]]
        labels = [labels_lib.load_labels(path).for_problems(keys) for path in labels_files]
        source = "labels file"
    else:
        _check_same_annotations(pairing, annotations)
        labels = []
        for i, (name, side) in enumerate(zip("AB", sides)):
            result = labels_lib.perception_labels(
                side,
                judge,
                annotations=annotations,
                skip_failed=skip_failed,
                progress=None
                if progress is None
                else (lambda done, total, name=name: progress(name, done, total)),
            )
            labels.append(result.labels)
            skipped[i], details[i] = result.skipped, result.details
            if result.malformed:
                notes.append(
                    f"{name}: {result.malformed} malformed judge replies (missing verdicts count as 0)"
                )
        source = f"judge {judge!r}"
    report = mcnemar_report(
        pairing,
        labels[0],
        labels[1],
        label=label,
        file_a=path_a,
        file_b=path_b,
        skipped_a=skipped[0],
        skipped_b=skipped[1],
        notes=notes,
    )
    if save_labels:
        used = set(report.problems)  # the labels the table counts, not those of skipped pairs
        for path, side, side_labels, side_details in zip(save_labels, sides, labels, details):
            labels_lib.save_labels(
                path, [r for r in side if r.name in used], side_labels, source=source, details=side_details
            )
    return report


def _check_same_annotations(pairing: Pairing, annotations) -> None:
    # Judging A and B against different annotation lists would compare different questions.
    for ra, rb in pairing.pairs:
        found_a = labels_lib.record_annotations(ra, annotations)
        found_b = labels_lib.record_annotations(rb, annotations)
        if found_a and found_b and found_a != found_b:
            raise AnalysisError(
                f"{ra.name}: visual_annotations differ between A ({ra.where}) and B ({rb.where}); "
                f"both models must be judged against the same annotations"
            )
