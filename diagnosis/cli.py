"""`xray-diagnose IMAGE... [--json] [--out DIR] [--models DIR]` — the pipeline offline, no token, no Redis.

With ``--out DIR`` one JPEG per drawn finding (at most three: the flagged ones, else the top one) is
written as ``DIR/<image stem>_heatmap_<n>_<label>.jpg`` (n = 1, 2, 3 in the order drawn, label as in
the model card, e.g. ``film_heatmap_1_Effusion.jpg``); ``overlays`` in ``--json`` lists them and
``overlay`` is the first.

With ``--dicom-out DIR`` an analysed DICOM input also gives ``DIR/<stem>_sr.dcm`` (TID 1500
measurement report) and ``DIR/<stem>_sc_<n>.dcm`` (one Secondary Capture per evidence map), filed in
the source's study (``diagnosis.dicom_out``; UIDs under ``--uid-root`` or ``$DICOM_UID_ROOT``). With
``--pdf DIR`` an analysed input gives ``DIR/<stem>_report.pdf``, one page in ``--language`` and
``--page-size`` (``diagnosis.pdf_report``). ``--json`` lists them as ``dicom_files`` and ``pdf``.

``--json`` carries ``peaks``, parallel to ``overlays`` and ``heatmap_labels``: each overlay's hottest
red point [x, y] in the pixels of the image as sent (null: that overlay has no red). ``--draw LABEL``
(repeatable) draws exactly those findings' overlays, red included, whatever the mode flags: for
measuring where the maps point (``python -m training measure-heatmaps``).

The reply is rendered here, in ``--language``; ``--json`` carries it as ``message``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from contract.envelope import MODES
from contract.i18n import DEFAULT_LANGUAGE, LANGUAGES, pick_language

from .config import BACKENDS, HEATMAPS, PipelineConfig, cache_dir_from_environment, models_dir_from_environment


def _language(code: str) -> str:
    """``--language``: a shipped code, or a tag of one (``pt-BR``, ``fa-IR``); anything else stays as given,
    so that argparse's choices refuse it instead of answering in English."""
    picked = pick_language(code)
    return picked if picked != DEFAULT_LANGUAGE or code.lower().split("-")[0] == DEFAULT_LANGUAGE else code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xray-diagnose",
        description="Second opinion on X-ray images: X-ray or not, body part, chest findings, heatmap. "
                    "A decision aid, not a diagnosis.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--json", action="store_true", help="one JSON object per input line")
    parser.add_argument("--out", type=Path, help="folder for heatmap overlays: one JPEG per drawn finding, "
                        "<stem>_heatmap_<n>_<label>.jpg")
    parser.add_argument("--models", type=Path,
                        help="folder of model folders (default: $MODELS_DIR, else the repo's models/)")
    parser.add_argument("--mode", default=MODES[0], choices=list(MODES),
                        help="screening: a verdict and only the findings the model checks reliably (default); "
                             "clinician: every finding with its operating point and sensitivity/specificity/AUC")
    parser.add_argument("--language", default="en", type=_language, choices=list(LANGUAGES),
                        help="language of the report; a regional tag falls back to its language (pt-BR → pt)")
    parser.add_argument("--backend", default=PipelineConfig.backend, choices=list(BACKENDS),
                        help="torch (CPU or CUDA), onnx (ONNX Runtime, CPU), openvino / openvino-bf16 (CPU) or "
                             "eager (naive baseline)")
    parser.add_argument("--heatmap", default=PipelineConfig.heatmap, choices=list(HEATMAPS),
                        help="cam: from the forward pass (fast, equal to Grad-CAM here); gradcam: pytorch-grad-cam")
    parser.add_argument("--draw", action="append", metavar="LABEL",
                        help="draw this finding's overlay (a card label, e.g. Effusion; repeatable), red included, "
                             "whatever the mode flags: for measuring where the maps point")
    parser.add_argument("--device", default=PipelineConfig.device)
    parser.add_argument("--threads", type=int, help="intra-op threads of the backend (default: theirs)")
    parser.add_argument("--dicom-out", type=Path, metavar="DIR",
                        help="for an analysed DICOM input: a TID 1500 SR and one Secondary Capture per evidence map, "
                             "in the source's study (<stem>_sr.dcm, <stem>_sc_<n>.dcm); they carry patient data")
    parser.add_argument("--uid-root", default=os.environ.get("DICOM_UID_ROOT") or None,
                        help="UID root of the new DICOM objects, e.g. 1.2.826.0.1.3680043.10.1234. "
                             "(default: $DICOM_UID_ROOT, else 2.25. UUID-derived UIDs)")
    parser.add_argument("--pdf", type=Path, metavar="DIR",
                        help="for an analysed input: a one-page PDF report <stem>_report.pdf in --language")
    parser.add_argument("--page-size", default="A4", choices=["A4", "Letter"], help="page size of --pdf")
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The CLI's pipeline configuration: flags, then the same environment defaults as the workers."""
    return PipelineConfig(
        models_dir=args.models or models_dir_from_environment(),
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        heatmap=args.heatmap,
        cache_dir=cache_dir_from_environment(),
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    from .cards import CardError
    from .messages import render_reply
    from .pipeline import Analysis, Pipeline
    from .report import DiagnosisResult

    if args.dicom_out:
        from .dicom_out import check_uid_root

        try:
            check_uid_root(args.uid_root)
        except ValueError as error:
            print(f"xray-diagnose: {error}", file=sys.stderr)
            return 2
    try:
        pipeline = Pipeline.load(config_from_args(args))
    except CardError as error:
        print(f"xray-diagnose: cannot load models: {error}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in tqdm(args.images, desc="images", unit="img", disable=len(args.images) < 3, file=sys.stderr):
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        if data is None:  # a missing file is reported like any other unreadable input
            analysis = Analysis(DiagnosisResult(file=str(path), outcome="rejected", rejection="unreadable"))
        else:
            wants_overlays = any(x is not None for x in (args.out, args.dicom_out, args.pdf, args.draw))
            try:
                analysis = pipeline.run(data, file=str(path), make_overlay=wants_overlays, mode=args.mode,
                                        draw=args.draw)
            except ValueError as error:  # --draw names a label the model does not have
                print(f"xray-diagnose: {error}", file=sys.stderr)
                return 2
        result = analysis.result
        if result.outcome == "rejected":
            failures += 1
        if args.out:
            for number, (label, jpeg) in enumerate(analysis.overlays, start=1):
                target = args.out / overlay_name(path, number, label)
                target.write_bytes(jpeg)
                result.overlays.append(str(target))
            result.overlay = result.overlays[0] if result.overlays else None
        result.message = render_reply(result, args.language)
        record, extra = result.model_dump(mode="json"), []
        if data is not None and (args.dicom_out or args.pdf):
            written, failed = _documents(args, path, data, analysis)
            failures += failed
            record.update(written)
            extra = [f"{key}: {', '.join(v) if isinstance(v, list) else v}" for key, v in written.items() if v]
        _emit(args, record, _readable(result, extra))
    return 1 if failures else 0


def _documents(args: argparse.Namespace, path: Path, data: bytes, analysis) -> tuple[dict, int]:
    """The DICOM objects and the PDF asked for, written where the user said; (record fields, failures).

    An input they cannot be made for is named on stderr (safe reasons only, no patient data)."""
    written: dict = {}
    failed = 0
    result = analysis.result
    if args.dicom_out:
        from . import dicom_out
        from .intake import _looks_like_dicom

        written["dicom_files"] = []
        try:
            if not _looks_like_dicom(data):
                raise dicom_out.DicomOutError("the input is not a DICOM file")
            objects = dicom_out.build(data, result, analysis.overlays, uid_root=args.uid_root)
            written["dicom_files"] = [str(p) for p in dicom_out.write(objects, args.dicom_out, path.stem)]
        except dicom_out.DicomOutError as error:
            print(f"xray-diagnose: no DICOM objects for {path}: {error}", file=sys.stderr)
            failed = 1
    if args.pdf:
        from . import pdf_report
        from .intake import ImageRejected, decode

        written["pdf"] = None
        if result.outcome == "analysed":
            try:
                image = decode(data).gray
            except ImageRejected:  # pragma: no cover - it was analysed, so it decodes
                image = None
            pdf = pdf_report.report_pdf(result, analysis.overlays, image, args.language, args.page_size)
            written["pdf"] = str(pdf_report.write(pdf, args.pdf, path.stem))
        else:
            print(f"xray-diagnose: no PDF report for {path}: the image was not analysed ({result.outcome})",
                  file=sys.stderr)
    return written, min(failed, 1)


def overlay_name(image: Path, number: int, label: str) -> str:
    """``<image stem>_heatmap_<n>_<label>.jpg``: n in drawn order, the label made safe for a file name."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    return f"{image.stem}_heatmap_{number}_{safe}.jpg"


def _emit(args: argparse.Namespace, record: dict, text: str) -> None:
    if args.json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        print(text + "\n", flush=True)


def _readable(result, extra: list[str] | None = None) -> str:
    head = f"== {result.file}"
    facts = []
    if result.xray_probability is not None:
        facts.append(f"X-ray: {'yes' if result.is_xray else 'no'} ({result.xray_probability:.1%})")
    if result.body_part_probability is not None:
        facts.append(f"body part: {result.body_part or 'uncertain'} ({result.body_part_probability:.1%})")
    if result.verdict:
        facts.append(f"mode: {result.mode}, verdict: {result.verdict}")
    if result.findings:
        facts.append("findings: " + ", ".join(
            f"{f.label} {f.probability:.1%}{' *' if f.positive else ''}" for f in result.findings))
    if result.overlays:
        facts.append("overlays: " + ", ".join(result.overlays))
    facts.extend(extra or [])
    facts.append("time: " + ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items()))
    return "\n".join([head, *facts, "", result.message])


if __name__ == "__main__":
    sys.exit(main())
