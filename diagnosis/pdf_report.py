"""A one-page PDF report of an analysed image (A4 or Letter), in every shipped language.

What is on the page: the service and model versions (with each model card's sha256), the date, the
image and its evidence maps, the verdict with its error rate, every finding's calibrated estimate with
the chosen mode's operating point and its sensitivity/specificity/PPV/AUC on the validation films,
image-quality notes, the limits and the prompt to see a physician. No patient identifiers: the
report is built from the result and the pixels only, never from DICOM tags.

The words come from the ``diagnosis`` gettext catalogs (``diagnosis.messages`` for what the chat
reply also says). The library is fpdf2 (pure Python, embeds TrueType subsets, kept: releases
through 2025-26). Fonts, chosen per language (``font_paths``), never guessed from the system:

* DejaVu Sans as shipped by matplotlib, a dependency of the inference extra: Latin and Cyrillic
  (Kazakh ә ғ қ ң ө ұ ү һ і, Tajik ҷ ӣ ӯ included), and the marks the report draws (▲ • ⚕ —);
* Noto Sans Devanagari (Hindi) and Noto Sans Arabic (Persian, Arabic) from Debian's
  ``fonts-noto-core`` at its known path (``.ci/run`` and the worker image install it; missing:
  ``FontMissing`` says which package to install). DejaVu Sans is their fallback for what they lack
  (Latin, parentheses, the marks).

Devanagari conjuncts and joined, right-to-left Arabic script need text shaping: fpdf2 with HarfBuzz
(``uharfbuzz``), switched on for those languages. Right-to-left pages are mirrored: text aligned
right, the findings table's columns from right to left. ``tests/test_pacs.py`` renders one report
per language and checks every character of every catalog string against the chosen fonts.

One page whatever the language: the page is laid out with the images at their largest height and,
should the text not fit, again with smaller images (``IMAGE_HEIGHTS_MM``).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from fpdf import FPDF
from fpdf.enums import XPos, YPos
from PIL import Image

from contract.i18n import N_, RTL, fill, pick_language

from .messages import (
    OVERLAY_COLOURS,
    OVERLAY_NOT_A_DIAGNOSIS,
    PHYSICIAN,
    RECTIFIED_NOTE,
    _percent,
    analysed_heading,
    finding_name,
    gettext_for,
    verdict_lines,
)
from .report import DiagnosisResult

PAGE_SIZES = ("A4", "Letter")
MARGIN_MM = 12.0
IMAGE_HEIGHTS_MM = (80.0, 70.0, 62.0, 54.0, 46.0, 38.0, 30.0)
FONT = "main"  # the language's font family in the document (DejaVu Sans, or its script's Noto)
FALLBACK = "dejavu"  # where the language's font is a script font: Latin, digits, marks
# Debian's fonts-noto-core (apt-get install fonts-noto-core): its fonts, at the path Debian installs them.
NOTO_PACKAGE = "fonts-noto-core"
NOTO_DIR = Path("/usr/share/fonts/truetype/noto")
SCRIPT_FONTS = {"hi": "NotoSansDevanagari", "fa": "NotoSansArabic", "ar": "NotoSansArabic"}
SHAPED = frozenset(SCRIPT_FONTS)  # languages whose script needs HarfBuzz shaping (conjuncts, joining)

TITLE = N_("X-ray second opinion: automated report")
SERVICE_LINE = N_("Service: {service} {version}. Report made {date}.")
MODELS_LINE = N_("Models (name, version, card sha256): {models}.")
MODE_LINE = N_("Mode: {mode}.")
MODE_NAMES = {"screening": N_("screening"), "clinician": N_("clinician")}
IMAGE_CAPTION = N_("Image as analysed")
MAP_CAPTION = N_("Evidence map: {name} ({p})")
FINDINGS_HEADING = N_("Findings")
COLUMNS = (N_("Finding"), N_("Estimate"), N_("Point"), N_("Sens."), N_("Spec."), N_("PPV"), "AUC", "▲")
ANY_FINDING = N_("Any finding (abnormal score)")
TABLE_NOTE = N_("Estimate: calibrated model probability. Point: the operating point of this mode; a finding at "
                "or above it is flagged (▲). Sens., Spec., PPV (positive predictive value) and AUC were measured "
                "on the validation films, PPV at their prevalence. A dash: not measured.")
QUALITY_HEADING = N_("Image quality")
CHECKS_LINE = N_("X-ray likelihood {xray}; recognised as an X-ray of the {part} (likelihood {part_p}); "
                 "input: {format}.")
DICOM_NOTE = N_("A DICOM file is read as stored: the photo checks (exposure, focus, glare, framing) do not apply.")
PHOTO_OK = N_("The photo checks (exposure, focus, glare, framing) found no problem.")
LIMITS_HEADING = N_("Limits")
LIMITS = (
    N_("The models were trained on small public data sets and have not been clinically validated."),
    N_("The error rates were measured on validation films from public data sets; in your clinic they may "
       "differ."),
    N_("An evidence map shows which areas moved the estimate, not where a disease is."),
    N_("Only the findings listed were checked; the film may show other things these models cannot see."),
)


class FontMissing(RuntimeError):
    """The font a language's report needs is not installed (the message says which package)."""


def dejavu_paths() -> tuple[Path, Path]:
    """DejaVu Sans regular and bold, as shipped inside matplotlib (no system fonts)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"


def font_paths(language: str = "en") -> tuple[Path, Path]:
    """The regular and bold font of ``language``'s report: its script's Noto font from Debian's
    fonts-noto-core (Hindi, Persian, Arabic; FontMissing when not installed), else DejaVu Sans."""
    language = pick_language(language)
    family = SCRIPT_FONTS.get(language)
    if family is None:
        return dejavu_paths()
    paths = (NOTO_DIR / f"{family}-Regular.ttf", NOTO_DIR / f"{family}-Bold.ttf")
    for path in paths:
        if not path.is_file():
            raise FontMissing(f"the PDF report in {language!r} needs the font {path.name} from the Debian package "
                              f"{NOTO_PACKAGE}, not found at {path}: apt-get install {NOTO_PACKAGE}")
    return paths


def report_pdf(result: DiagnosisResult, overlays: list[tuple[str | None, bytes]], image: np.ndarray | None = None,
               language: str = "en", page_size: str = "A4", service_version: str | None = None,
               now: datetime | None = None) -> bytes:
    """The report as PDF bytes. ``image``: the analysed grayscale image (None: the maps only);
    ``overlays``: (label, JPEG) per evidence map. Only for analysed results (ValueError otherwise)."""
    if result.outcome != "analysed":
        raise ValueError(f"a report is made for analysed images only, not outcome {result.outcome!r}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page size must be one of {PAGE_SIZES}")
    language = pick_language(language)
    if service_version is None:
        from .dicom_out import service_version as installed

        service_version = installed()
    now = now or datetime.now(UTC)
    for height in IMAGE_HEIGHTS_MM:
        pdf = _Report(result, overlays, image, language, page_size, service_version, now, height).render()
        if pdf.pages_count == 1:
            return bytes(pdf.output())
    raise RuntimeError("the report does not fit on one page")  # pragma: no cover - the smallest layout fits


class _Report:
    def __init__(self, result: DiagnosisResult, overlays: list[tuple[str | None, bytes]], image: np.ndarray | None,
                 language: str, page_size: str, version: str, now: datetime, image_height: float):
        self.result, self.overlays, self.image, self.language = result, overlays, image, language
        self.page_size, self.version, self.now, self.image_height = page_size, version, now, image_height
        self._ = gettext_for(language)
        self.rtl = language in RTL
        self.align = "R" if self.rtl else "L"  # where a paragraph starts
        self.pdf = FPDF(orientation="P", unit="mm", format=page_size)

    @property
    def width(self) -> float:
        return self.pdf.epw  # effective page width

    def render(self) -> FPDF:
        pdf, _ = self.pdf, self._
        regular, bold = font_paths(self.language)
        pdf.add_font(FONT, "", str(regular))
        pdf.add_font(FONT, "B", str(bold))
        if self.language in SCRIPT_FONTS:
            fallback_regular, fallback_bold = dejavu_paths()
            pdf.add_font(FALLBACK, "", str(fallback_regular))
            pdf.add_font(FALLBACK, "B", str(fallback_bold))
            pdf.set_fallback_fonts([FALLBACK])
        if self.language in SHAPED:
            pdf.set_text_shaping(True)  # HarfBuzz: Devanagari conjuncts, joined Arabic letters, bidi
        pdf.set_margins(MARGIN_MM, MARGIN_MM, MARGIN_MM)
        pdf.set_auto_page_break(True, margin=MARGIN_MM)
        pdf.set_title(_(TITLE))
        pdf.set_creator(f"xray-second-opinion {self.version}")
        pdf.set_lang(self.language)
        pdf.set_creation_date(self.now)
        pdf.add_page()
        self.header()
        self.images()
        self.verdict()
        self.table()
        self.quality()
        self.limits()
        self.physician()
        return pdf

    def text(self, text: str, size: float = 8.5, bold: bool = False, colour: tuple[int, int, int] = (0, 0, 0),
             gap: float = 0.0) -> None:
        self.pdf.set_font(FONT, "B" if bold else "", size)
        self.pdf.set_text_color(*colour)
        self.pdf.multi_cell(self.width, size * 0.45, text, align=self.align, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.settle()
        if gap:
            self.pdf.ln(gap)

    def settle(self) -> None:
        """After a line drawn with a fallback font: make fpdf2 state the page's font again before the
        next line. fpdf2 2.8 sets the font of a line that opens with a fallback glyph ("▲", "AUC",
        "•") inside that line's q … Q, which restores the previous font, yet records it as set, so
        the next line was drawn with a stale font (wrong size, wrong glyphs: seen in Arabic tables)."""
        if self.language in SCRIPT_FONTS:
            self.pdf.current_font_is_set_on_page = False

    def heading(self, text: str) -> None:
        self.pdf.ln(1.2)
        self.text(text, size=10, bold=True, colour=(20, 50, 100), gap=0.4)

    def header(self) -> None:
        _, result = self._, self.result
        self.text(_(TITLE), size=15, bold=True, colour=(20, 50, 100), gap=0.6)
        self.text(_(OVERLAY_NOT_A_DIAGNOSIS), size=10, bold=True, colour=(170, 20, 20), gap=0.8)
        date = self.now.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.text(fill(_(SERVICE_LINE), self.language, service="xray-second-opinion", version=self.version,
                       date=date), size=7.5)
        models = "; ".join(f"{name} {version} {result.model_cards.get(name, '?')[:12]}"
                           for name, version in result.models.items()) or "?"
        self.text(fill(_(MODELS_LINE), self.language, models=models), size=7.5)
        self.text(fill(_(MODE_LINE), self.language, mode=_(MODE_NAMES.get(result.mode, result.mode))), size=7.5,
                  gap=1.5)

    def images(self) -> None:
        """The image, then one evidence map per drawn finding, side by side, captions below."""
        _, pdf = self._, self.pdf
        panels: list[tuple[Image.Image, str]] = []
        if self.image is not None:
            panels.append((Image.fromarray(np.ascontiguousarray(self.image, dtype=np.uint8)), _(IMAGE_CAPTION)))
        probabilities = {f.label: f.probability for f in self.result.findings}
        for label, jpeg in self.overlays[:3]:
            with Image.open(io.BytesIO(jpeg)) as opened:
                picture = opened.convert("RGB")
            name = finding_name(label, self.language) if label else ""
            caption = fill(_(MAP_CAPTION), self.language, name=name, p=_percent(probabilities.get(label)))
            panels.append((picture, caption))
        if not panels:
            return
        gap = 4.0
        slot = (self.width - gap * (len(panels) - 1)) / len(panels)
        scales = [min(slot / p.width, self.image_height / p.height) for p, _caption in panels]
        row_h = max(p.height * k for (p, _caption), k in zip(panels, scales, strict=True))
        top, x = pdf.get_y(), pdf.l_margin
        for (picture, caption), scale in zip(panels, scales, strict=True):
            w, h = picture.width * scale, picture.height * scale
            pdf.image(picture, x=x + (slot - w) / 2, y=top + (row_h - h), w=w, h=h)  # bottoms aligned
            pdf.set_xy(x, top + row_h + 0.8)
            pdf.set_font(FONT, "", 7.5)
            pdf.set_text_color(0, 0, 0)
            pdf.multi_cell(slot, 3.2, caption, align="C")
            self.settle()
            x += slot + gap
        pdf.set_xy(pdf.l_margin, top + row_h + 8.0)
        if self.overlays:
            self.text(_(OVERLAY_COLOURS), size=7, colour=(60, 60, 60))

    def verdict(self) -> None:
        result = self.result
        self.heading(analysed_heading(result.body_part or "", self.language))
        lines = verdict_lines(result, self.language)
        self.text(lines[0], size=9.5, bold=True)
        for line in lines[1:]:
            self.text(line, size=8.5)

    def table(self) -> None:
        _, pdf, result = self._, self.pdf, self.result
        self.heading(_(FINDINGS_HEADING))
        widths = [66.0, 19.0, 19.0, 19.0, 19.0, 17.0, 14.0]
        widths.append(self.width - sum(widths))
        row_h = 4.3
        order = list(range(len(widths)))[::-1] if self.rtl else list(range(len(widths)))  # RTL: from the right

        def cells(texts: list[str], height: float, fill: bool, size: float, style: str) -> None:
            for index in order:
                text, width = texts[index], widths[index]
                pdf.set_font(FONT, style, size)
                while size > 5.5 and pdf.get_string_width(text) > width - 2 * pdf.c_margin:  # long names fit
                    size -= 0.25
                    pdf.set_font(FONT, style, size)
                pdf.cell(width, height, text, border=1, fill=fill, align="C" if index else self.align)
                self.settle()
                size = 7.5
            pdf.ln(height)

        pdf.set_fill_color(225, 232, 242)
        pdf.set_text_color(0, 0, 0)
        cells([column if column in ("AUC", "▲") else _(column) for column in COLUMNS], row_h + 0.6, True, 7.5, "B")

        def row(texts: list[str], flagged: bool, bold: bool = False) -> None:
            pdf.set_fill_color(252, 236, 232)
            cells(texts, row_h, flagged, 7.5, "B" if bold or flagged else "")

        for finding in result.findings:
            row([finding_name(finding.label, self.language),
                 _percent(finding.probability, 1 if finding.probability < 0.1 else 0),
                 _dash(finding.threshold, 1), _dash(finding.sensitivity), _dash(finding.specificity),
                 _dash(finding.ppv), "—" if finding.auc is None else f"{finding.auc:.2f}",
                 "▲" if finding.positive else ""], finding.positive)
        if result.abnormal_probability is not None:
            point = result.verdict_point or {}
            row([_(ANY_FINDING), _percent(result.abnormal_probability), _dash(point.get("threshold"), 1),
                 _dash(point.get("sensitivity")), _dash(point.get("specificity")), _dash(point.get("ppv")), "—",
                 ""], False, bold=True)
        pdf.ln(0.8)
        self.text(_(TABLE_NOTE), size=6.8, colour=(60, 60, 60))

    def quality(self) -> None:
        _, result = self._, self.result
        self.heading(_(QUALITY_HEADING))
        part = result.body_part or "?"
        from .messages import body_part_name

        self.text(fill(_(CHECKS_LINE), self.language, xray=_percent(result.xray_probability),
                       part=body_part_name(part, self.language), part_p=_percent(result.body_part_probability),
                       format=result.input_format or "?"), size=8)
        if result.input_format == "DICOM":
            self.text(_(DICOM_NOTE), size=8)
        else:
            self.text(_(RECTIFIED_NOTE) if result.rectified else _(PHOTO_OK), size=8)

    def limits(self) -> None:
        _ = self._
        self.heading(_(LIMITS_HEADING))
        for line in LIMITS:
            self.text("• " + _(line), size=7.8)

    def physician(self) -> None:
        pdf = self.pdf
        pdf.ln(2.0)
        pdf.set_draw_color(170, 20, 20)
        pdf.set_line_width(0.5)
        pdf.set_font(FONT, "B", 9.5)
        pdf.set_text_color(170, 20, 20)
        pdf.multi_cell(self.width, 4.6, "⚕ " + self._(PHYSICIAN), border=1, padding=1.5, align=self.align,
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.settle()


def _dash(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else _percent(value, digits)


def write(pdf: bytes, directory: Path, stem: str) -> Path:
    """``<stem>_report.pdf`` in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}_report.pdf"
    path.write_bytes(pdf)
    return path
