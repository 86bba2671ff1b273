"""`python -m training measure-replies`: what the real service would tell people about chest films.

Runs the whole ``Pipeline`` (intake, photo step, gate, body part, chest model with the card's
calibration and operating points) on the NIH chest films of one split whose 14 labels are known, in
screening mode by default, and counts what the reply flags: share of normal films (no finding) with
at least one flag and flags per normal film (targets ≤ 0.10 and ≤ 0.2; ``--mode clinician`` counts the
▲ marks instead, target ≤ 0.5 per normal film), share of abnormal films with
a flag, each label's PPV among the films it flags, the calibrated probabilities' ECE, and the
verdict's sensitivity, specificity and PPV. A film the gate or body-part model turns away counts as
not flagged (and as "no verdict").
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diagnosis.config import PipelineConfig, models_dir_from_environment

from ..data.datasets import CHEST_LABELS, Record, labelled_films, targets
from .metrics import ece


def measure(records: list[Record], models: Path | None = None, split: str = "test", mode: str = "screening",
            backend: str = "onnx", threads: int | None = None, limit: int | None = None,
            batch: int = 16) -> dict:
    from diagnosis.pipeline import Pipeline

    films = labelled_films(records, split)[:limit]
    if not films:
        raise SystemExit(f"no NIH films with all 14 labels in split {split!r}")
    pipeline = Pipeline.load(PipelineConfig(models_dir=models or models_dir_from_environment(), backend=backend,
                                            threads=threads))
    truth = targets(films)
    abnormal = truth.sum(axis=1) > 0
    flags = np.zeros_like(truth, dtype=bool)
    probs = np.full(truth.shape, np.nan)
    verdicts: list[str | None] = []
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for start in range(0, len(films), batch):
        chunk = films[start:start + batch]
        analyses = pipeline.run_batch([r.path.read_bytes() for r in chunk], [str(r.path) for r in chunk],
                                      make_overlay=False, modes=[mode] * len(chunk))
        for offset, analysis in enumerate(analyses):
            result, row = analysis.result, start + offset
            outcome = result.outcome if result.outcome != "analysed" else f"analysed:{result.body_part}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            verdicts.append(result.verdict)
            for finding in result.findings:
                if finding.label in CHEST_LABELS:
                    column = CHEST_LABELS.index(finding.label)
                    probs[row, column], flags[row, column] = finding.probability, finding.positive
    seconds = time.monotonic() - started
    counts = flags.sum(axis=1)
    per_label = {}
    for i, label in enumerate(CHEST_LABELS):
        flagged = int(flags[:, i].sum())
        per_label[label] = {"flagged": flagged, "true": int((flags[:, i] & (truth[:, i] == 1)).sum()),
                            "positives": int(truth[:, i].sum()),
                            "ppv": float((truth[flags[:, i], i]).mean()) if flagged else None}
    seen = ~np.isnan(probs).any(axis=1)
    shown = np.asarray([v in ("see_doctor", "urgent") for v in verdicts])
    eces = [ece(truth[seen, i], probs[seen, i]) for i in range(len(CHEST_LABELS))]
    return {
        "split": split, "mode": mode, "films": len(films), "normal_films": int((~abnormal).sum()),
        "abnormal_films": int(abnormal.sum()), "outcomes": outcomes, "seconds": round(seconds, 1),
        "normal_with_a_flag": float((counts[~abnormal] > 0).mean()) if (~abnormal).any() else None,
        "flags_per_normal_film": float(counts[~abnormal].mean()) if (~abnormal).any() else None,
        "max_flags_on_a_normal_film": int(counts[~abnormal].max()) if (~abnormal).any() else 0,
        "abnormal_with_a_flag": float((counts[abnormal] > 0).mean()) if abnormal.any() else None,
        "per_label": per_label,
        "ece_mean_calibrated": float(np.mean([e for e in eces if e is not None])),
        "ece_calibrated": dict(zip(CHEST_LABELS, eces, strict=True)),
        "verdicts": {str(v): verdicts.count(v) for v in sorted(set(verdicts), key=str)},
        "verdict_sensitivity": float(shown[abnormal].mean()) if abnormal.any() else None,
        "verdict_specificity": float((~shown[~abnormal]).mean()) if (~abnormal).any() else None,
        "verdict_ppv": float(abnormal[shown].mean()) if shown.any() else None,
    }


def print_table(report: dict) -> None:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    print(f"{report['split']} split, {report['mode']} mode: {report['films']} NIH films with all 14 labels "
          f"({report['normal_films']} normal, {report['abnormal_films']} abnormal); {report['seconds']} s")
    print(f"outcomes: {report['outcomes']}")
    print("| measure | value | target |\n|---|---|---|")
    per_normal = report["flags_per_normal_film"]
    screening = report["mode"] == "screening"  # clinician mode: ▲ marks, target ≤ 0.5 per normal film (#22)
    print(f"| normal films with ≥ 1 flag | {pct(report['normal_with_a_flag'])} | {'≤ 10 %' if screening else ''} |")
    print(f"| flags per normal film | {'—' if per_normal is None else f'{per_normal:.3f}'} | "
          f"{'≤ 0.2' if screening else '≤ 0.5'} |")
    print(f"| abnormal films with ≥ 1 flag | {pct(report['abnormal_with_a_flag'])} | |")
    print(f"| mean ECE of the calibrated probabilities (15 bins) | {report['ece_mean_calibrated']:.4f} | |")
    print(f"| verdict 'see a doctor soon': sensitivity / specificity / PPV | "
          f"{pct(report['verdict_sensitivity'])} / {pct(report['verdict_specificity'])} / "
          f"{pct(report['verdict_ppv'])} | |")
    print(f"verdicts: {report['verdicts']}")
    print("| label | flagged | true | positives | PPV |\n|---|---|---|---|---|")
    for label, row in report["per_label"].items():
        if row["flagged"]:
            print(f"| {label} | {row['flagged']} | {row['true']} | {row['positives']} | {pct(row['ppv'])} |")
