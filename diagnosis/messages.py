"""What a user is told about a result, in their language. Never a diagnosis; always a physician.

The pipeline returns data only; the reply is rendered here, once, at the edge: by the delivery
worker in the user's language, by the CLI in ``--language``. Labels and body parts come from the
model cards; each needs an entry below and in every catalog (``diagnosis/locales``, domain
``diagnosis``), which a test checks for the shipped cards.
"""

from __future__ import annotations

import math
from pathlib import Path

from contract import texts as bot_texts
from contract.formats import FORMAT_NAMES
from contract.i18n import N_, fill, isolate, load_catalog, pick_language
from contract.keys import TELEGRAM_DOWNLOAD_LIMIT_MB

from .report import DiagnosisResult

DOMAIN = "diagnosis"
LOCALES_DIR = Path(__file__).parent / "locales"

# Plain-language name and one line of meaning per finding label (the ChestX-ray14 labels).
FINDINGS = {
    "Atelectasis": (N_("Atelectasis"), N_("part of a lung may be collapsed or not fully inflated")),
    "Cardiomegaly": (N_("Cardiomegaly"), N_("the heart may look larger than usual")),
    "Effusion": (N_("Pleural effusion"), N_("there may be fluid around a lung")),
    "Infiltration": (N_("Infiltration"), N_("an area of the lung may be denser than usual (fluid, cells)")),
    "Mass": (N_("Mass"), N_("a larger spot (over 3 cm) may be visible in the chest")),
    "Nodule": (N_("Nodule"), N_("a small round spot may be visible in a lung")),
    "Pneumonia": (N_("Pneumonia"), N_("signs that can go with a lung infection")),
    "Pneumothorax": (N_("Pneumothorax"), N_("air may be outside the lung")),
    "Consolidation": (N_("Consolidation"), N_("part of the lung may be filled with fluid or tissue")),
    "Edema": (N_("Pulmonary oedema"), N_("there may be extra fluid in the lungs")),
    "Emphysema": (N_("Emphysema"), N_("signs of damaged, over-inflated air sacs")),
    "Fibrosis": (N_("Fibrosis"), N_("signs of scarring in the lung tissue")),
    "Pleural_Thickening": (N_("Pleural thickening"), N_("the lining around a lung may be thickened")),
    "Hernia": (N_("Hiatal hernia"), N_("part of the stomach may reach up into the chest")),
}
# Urgent wording, used only for a label whose card point allows it (``urgent``: its PPV justifies it).
# Its keys are the one list of labels that may be called urgent: ``python -m training calibrate`` marks
# a point ``urgent`` only for them.
URGENT_MEANING = {
    "Pneumothorax": N_("air may be outside the lung; urgent if you are short of breath"),
}
# Body parts, in the form that fits "X-ray of the …" (genitive in Russian and Kazakh).
BODY_PARTS = {
    "ankle": N_("ankle"), "spine": N_("spine"), "chest": N_("chest"), "elbow": N_("elbow"),
    "finger": N_("finger"), "foot": N_("foot"), "forearm": N_("forearm"), "hand": N_("hand"),
    "hip": N_("hip"), "humerus": N_("upper arm"), "knee": N_("knee"), "shoulder": N_("shoulder"),
    "dental": N_("dental (teeth)"), "wrist": N_("wrist"),
}  # fmt: skip
REJECTIONS = {
    "empty": N_("The file is empty. Please send the image again."),
    "unsupported": N_("I could not recognise this file as an image. Please send an image file ({formats}), "
                      "or simply a photo."),
    "corrupt": N_("The image file seems damaged or incomplete. Please send it again, or take a new photo."),
    "too_small": N_("The image is too small to analyse. Please send a larger, sharper image."),
    "too_many_pixels": N_("The image is too large in pixels to analyse safely. Please send a smaller version."),
    "unreadable": N_("The file could not be read. Please check it and send it again."),
    "no_pixels": N_("This DICOM file contains no image. Please send a DICOM file with the picture in it."),
}
# Quality problems (diagnosis/quality.py codes) → concrete advice for a retake.
ADVICE: dict[str, str] = {
    "too_dark": N_("The image is too dark. Photograph the film on a lit light box or against a bright "
                   "window, or turn up the screen's brightness."),
    "too_bright": N_("The image is too bright and washed out. Lower the light box or screen brightness, "
                     "or move away from direct light."),
    "blurred": N_("The image is blurred. Hold the phone steady, tap the film to focus, and take the photo "
                  "again."),
    "glare": N_("A reflection hides part of the image. Avoid the lamp's reflection: tilt the film or move "
                "the light."),
    "too_small": N_("The image has too few pixels. Send the original file or photograph the film from closer."),
    "film_too_small": N_("The film fills too little of the photo. Come closer so that the film fills most of "
                         "the frame, and hold the phone parallel to the film."),
}
# The same problems in a file that is not a photo (DiagnosisResult.photographed):
# asking to photograph it better would be wrong; ask for the original file. Glare and a film too
# small in the frame are asked of photos only (diagnosis.quality).
ADVICE_FILE: dict[str, str] = {
    "too_dark": N_("The image is too dark. Please send the original file from the clinic, or a photo of the film "
                   "on a lit light box."),
    "too_bright": N_("The image is too bright and washed out. Please send the original file from the clinic."),
    "blurred": N_("The image is blurred. Please send the original file from the clinic, or a sharp photo of the "
                  "whole film."),
    "too_small": N_("The image has too few pixels. Please send the original file from the clinic."),
}

# Non-X-ray images the gate card's modality head can name: one whole sentence each (translations
# need the noun's own grammar). Medical images keep the physician footer; non-medical ones do not.
MODALITIES = {
    "ct": N_("This looks like a CT scan; I can only read X-ray radiographs."),
    "mri": N_("This looks like an MRI scan; I can only read X-ray radiographs."),
    "ultrasound": N_("This looks like an ultrasound image; I can only read X-ray radiographs."),
    "other_medical": N_("This looks like a medical image, but not an X-ray radiograph; I can only read X-ray "
                        "radiographs."),
}
SEND_RADIOGRAPH = N_("Please send a radiograph: a file from the clinic, or a straight, sharp photo of the whole "
                     "film or screen.")

RETAKE_HEADING = N_("The photo is not good enough to analyse:")  # followed by the advice, one per line
RETAKE_HEADING_FILE = N_("This image is not good enough to analyse:")  # the same for a file (not a photo)
RECTIFIED_NOTE = N_("The photo was straightened and cropped to the film before analysis.")
TURNED_NOTE = N_("I turned your picture upright before reading it.")

# Overlay captions (diagnosis/overlay.py draws no words: the title and the colours' meaning are here).
OVERLAY_TITLE = N_("Heat map: {name} (model estimate {p}).")
OVERLAY_TITLE_UNNAMED = N_("Heat map of the model's estimate.")
# Red/blue are relative to films without findings (diagnosis.heatmap.relative_evidence, issue #22).
OVERLAY_COLOURS = N_("Red: areas where this film raised the estimate more than typical films without findings do. "
                     "Blue: areas where it raised it less. The stronger the colour, the larger the difference.")
# A finding drawn although nothing was flagged: its red is not drawn (diagnosis.pipeline), and the
# caption says so, so that the picture never looks like evidence of a finding the reply does not report.
OVERLAY_TITLE_NOT_FLAGGED = N_("Map for {name}, which was not flagged (model estimate {p}): no area is marked red.")
OVERLAY_COLOURS_NOT_FLAGGED = N_("Blue: areas where this film raised the estimate less than typical films without "
                                 "findings do. The map does not show a finding.")
OVERLAY_NOT_A_DIAGNOSIS = N_("This is not a diagnosis: only a physician can interpret the image.")

PHYSICIAN = N_("This is an automated second opinion, not a diagnosis. Please show the image and this "
               "result to a physician, who can examine you and decide what it means.")
# A radiograph (or another medical image) that was not read still belongs with a physician; the
# prompt above speaks of "this result", so an unread image gets its own line.
PHYSICIAN_UNREAD = N_("I have not analysed this image. Please show it to a physician.")

# Nothing flagged: what was not found first, then that the check misses many cases (never "normal").
NO_CLEAR_SIGN = N_("No clear sign of {names} was found, but this check misses many cases, so it does not rule "
                   "them out.")
# Films the service does not read: no probabilities, and the parts it can read, from the cards present.
PART_RECOGNISED = N_("I recognised an X-ray of the {part}.")
ANALYSABLE_PARTS = N_("So far I can only analyse X-rays of the {parts}.")
PART_NOT_ANALYSABLE = N_("I cannot analyse X-rays of this body part yet.")
NOT_AN_XRAY = N_("This does not look like an X-ray image.")
CLINICIAN_HEADING = N_("All findings, the furthest above its point first (calibrated probability; operating point; "
                       "sensitivity / specificity / AUC on the validation films):")
CLINICIAN_MARKS = N_("▲ = at or above the point. The points were chosen on the validation films so that films "
                     "without a finding rarely get a ▲; a finding without ▲ is not ruled out.")
CLINICIAN_VERDICT = N_("The verdict above is the one screening mode gives (the abnormal score and the screening "
                       "points); ▲ marks each finding against its own point.")
PPV = N_("PPV {ppv}")


def gettext_for(language: str):
    """The ``_`` function of the ``diagnosis`` domain for one language (unknown → English)."""
    return load_catalog(LOCALES_DIR, pick_language(language), DOMAIN).gettext


def finding_name(label: str, language: str) -> str:
    _ = gettext_for(language)
    return _(FINDINGS[label][0]) if label in FINDINGS else label.replace("_", " ")


def body_part_name(part: str, language: str) -> str:
    _ = gettext_for(language)
    return _(BODY_PARTS[part]) if part in BODY_PARTS else part


def overlay_caption(label: str | None, probability: float | None, language: str, flagged: bool = True) -> str:
    """Caption of one overlay photo: the finding in words, its estimate, what red and blue mean.

    ``flagged`` False: the finding was drawn although the reply flags nothing, so its overlay has no
    red (``diagnosis.pipeline``); the caption says it was not flagged and what the blue means."""
    _ = gettext_for(language)
    if label and not flagged:
        title = fill(_(OVERLAY_TITLE_NOT_FLAGGED), language, name=finding_name(label, language),
                     p=_percent(probability))
        return "\n".join([title, _(OVERLAY_COLOURS_NOT_FLAGGED), _(OVERLAY_NOT_A_DIAGNOSIS)])
    title = (fill(_(OVERLAY_TITLE), language, name=finding_name(label, language), p=_percent(probability))
             if label else _(OVERLAY_TITLE_UNNAMED))
    return "\n".join([title, _(OVERLAY_COLOURS), _(OVERLAY_NOT_A_DIAGNOSIS)])


def album_caption(captions: list[str]) -> str:
    """One caption for an album of overlays (Telegram shows an album's caption once, under the album):
    each photo's own first line (its title), numbered in the album's order, then every other line of
    the photos' captions once (what the colours mean, "not a diagnosis"), in the order first seen."""
    titles, rest = [], []
    for number, caption in enumerate(captions, start=1):
        first, *others = caption.split("\n")
        titles.append(f"{number}. {first}" if len(captions) > 1 else first)
        rest.extend(line for line in others if line not in rest)
    return "\n".join(titles + rest)


def rejection_text(code: str, language: str) -> str:
    if code == "too_large":  # the bot refuses such a file before downloading it: one wording, in contract.texts
        return bot_texts.too_large(language)
    _ = gettext_for(language)
    return fill(_(REJECTIONS.get(code, REJECTIONS["corrupt"])), language, limit_mb=TELEGRAM_DOWNLOAD_LIMIT_MB,
                formats=FORMAT_NAMES)


def apology(language: str) -> str:
    _ = gettext_for(language)
    return _("Sorry — something went wrong while analysing your image and I could not finish. "
             "Please try again in a few minutes.") + "\n\n" + _(PHYSICIAN)


def analysed_heading(part: str, language: str) -> str:
    """First line of an analysed result: the body part (from the card) and "not a diagnosis"."""
    _ = gettext_for(language)
    return _sentence(fill(_("{part} X-ray analysed. Model estimates, not a diagnosis:"), language,
                          part=body_part_name(part, language)))


# Radiographs the service recognised but did not read: the reply still sends them to a physician.
UNREAD_MEDICAL = ("body_part_not_analysed", "body_part_unknown", "body_part_uncertain")


def render_reply(result: DiagnosisResult, language: str = "en") -> str:
    """The complete reply text for one result, ending with the prompt to see a physician."""
    _ = gettext_for(language)
    lines: list[str] = []
    if result.outcome == "rejected":
        lines.append(rejection_text(result.rejection or "corrupt", language))
    elif result.outcome == "retake":
        advice = ADVICE if result.photographed else {**ADVICE, **ADVICE_FILE}
        lines.append(_(RETAKE_HEADING if result.photographed else RETAKE_HEADING_FILE))
        lines.extend(f"• {_(advice[code])}" for code in result.retake if code in advice)
    elif result.outcome == "not_xray" and result.modality in MODALITIES:
        lines.append(_(MODALITIES[result.modality]))
        lines.append(_(SEND_RADIOGRAPH))
    elif result.outcome == "not_xray" and result.modality == "non_medical":
        lines.append(_("Sorry, this does not look like an X-ray image, and X-ray radiographs are all I can "
                       "read."))
        lines.append(_("If you meant to send one, please send a file from the clinic, or a straight, sharp "
                       "photo of the whole film or screen."))
    elif result.outcome == "not_xray":
        lines.append(_(NOT_AN_XRAY))
        lines.append(_(SEND_RADIOGRAPH))
    elif result.outcome == "body_part_unknown":
        lines.append(_("This looks like an X-ray of a body part I cannot read yet, so I will not guess which "
                       "part it is or analyse it."))
        lines.extend(analysable_lines(result, language))
    elif result.outcome == "body_part_uncertain":
        lines.append(_("This looks like an X-ray, but I cannot tell which body part it shows."))
        lines.append(_("Please send a clearer image: the whole film, photographed straight on, in even light, "
                       "without glare or reflections."))
        lines.extend(analysable_lines(result, language))
    elif result.outcome == "body_part_not_analysed":
        lines.append(_sentence(fill(_(PART_RECOGNISED), language,
                                    part=body_part_name(result.body_part or "", language))))
        lines.extend(analysable_lines(result, language) or [_(PART_NOT_ANALYSABLE)])
    else:
        lines.append(analysed_heading(result.body_part or "", language))
        lines.extend(verdict_lines(result, language))
        if result.mode == "clinician":
            lines.extend(clinician_lines(result, language))
        else:
            lines.extend(screening_lines(result, language))
        if result.heatmap_labels:
            names = ", ".join(finding_name(label, language) for label in result.heatmap_labels)
            lines.append(fill(_("The heatmap pictures show, for {names}, the areas that raised (red) or lowered "
                                "(blue) the model's estimate."), language, names=names))
    if result.turned and result.is_xray and result.outcome != "retake":  # turned, and then read as an X-ray
        lines.append(_(TURNED_NOTE))
    if result.rectified and result.outcome != "retake":
        lines.append(_(RECTIFIED_NOTE))
    if result.outcome == "analysed":  # the physician prompt speaks of "this result": only where a reading was given
        lines.append("")
        lines.append("⚕️ " + _(PHYSICIAN))
    elif result.outcome in UNREAD_MEDICAL or (result.outcome == "not_xray" and result.modality in MODALITIES):
        lines.append("")
        lines.append("⚕️ " + _(PHYSICIAN_UNREAD))
    return "\n".join(lines)


def analysable_lines(result: DiagnosisResult, language: str) -> list[str]:
    """"So far I can only analyse X-rays of the chest." from the parts the result says the service reads
    (the abnormality cards present); none known (an older worker's result): no line."""
    sentence = analysable_sentence(result.analysable_parts, language)
    return [sentence] if sentence else []


def analysable_sentence(parts: list[str], language: str) -> str:
    """"So far I can only analyse X-rays of the chest.": the one sentence naming the parts the service reads,
    in the reply to a film of another part and in the bot's /start (``cards.analysable_parts``); "" for none."""
    if not parts:
        return ""
    _ = gettext_for(language)
    return fill(_(ANALYSABLE_PARTS), language, parts=", ".join(body_part_name(part, language) for part in parts))


def verdict_lines(result: DiagnosisResult, language: str) -> list[str]:
    """The verdict first, in plain words, with the check's honest error rate."""
    _ = gettext_for(language)
    point = result.verdict_point or {}
    sensitivity, ppv = point.get("sensitivity"), point.get("ppv")
    misses = _of_ten(None if sensitivity is None else 1 - sensitivity)
    if result.verdict == "urgent":
        lines = [_("Verdict: urgent signs. Please see a doctor today, or call emergency services if you "
                   "feel short of breath or unwell.")]
    elif result.verdict == "see_doctor":
        lines = [_("Verdict: signs worth showing a doctor soon.")]
        if ppv is not None:
            lines.append(fill(_("When this check raises a concern, about {n} of 10 such films do have a "
                                "finding."), language, n=_of_ten(ppv)))
    elif result.verdict == "no_strong_sign":
        lines = [_("Verdict: no strong sign of the findings this model checks reliably.")]
    else:
        return [_("Verdict: unsure. This model's answers have not been checked against a validated operating "
                  "point, so I cannot say whether the film shows signs of disease.")]
    if misses is not None:
        lines.append(fill(_("This check is far from perfect: it misses about {n} of 10 abnormal films, so it "
                            "does not rule out disease."), language, n=misses))
    return lines


def screening_lines(result: DiagnosisResult, language: str) -> list[str]:
    """Only flagged labels the model is good enough at, in neutral words; else "no clear sign of …, but
    this check misses many cases" (never "normal": that is what a worried person would remember)."""
    _ = gettext_for(language)
    checked = [f for f in result.findings if f.eligible]
    flagged = [f for f in result.positive_findings if f.eligible]
    lines: list[str] = []
    if flagged:
        lines.append(_("What the model points out (for a doctor to check):"))
        for finding in flagged:
            urgent = finding.urgent and finding.label in URGENT_MEANING
            meaning = _(URGENT_MEANING[finding.label]) if urgent else \
                _(FINDINGS[finding.label][1]) if finding.label in FINDINGS else ""
            line = f"• {finding_name(finding.label, language)}" + (f": {meaning}" if meaning else "")
            if finding.ppv is not None:
                line += " " + fill(_("(about {n} of 10 films flagged for this have it)"), language,
                                   n=_of_ten(finding.ppv))
            lines.append(line)
    elif checked:
        names = ", ".join(finding_name(f.label, language) for f in checked)
        lines.append(fill(_(NO_CLEAR_SIGN), language, names=names))
    if result.verdict == "unsure":
        top = result.findings[:3]
        if top:
            listed = ", ".join(f"{finding_name(f.label, language)} {isolate(_percent(f.probability), language)}"
                               for f in top)
            lines.append(fill(_("Highest model estimates (not checked for reliability): {list}."), language,
                              list=listed))
    elif checked:
        lines.append(_("The other findings are not flagged: the model is not reliable enough at them. "
                       "Clinician mode lists all of them with their error rates."))
    return lines


def clinician_lines(result: DiagnosisResult, language: str) -> list[str]:
    """All labels compactly, the furthest above its point first: calibrated probability, the label's
    point, sensitivity/specificity/AUC (val), and the PPV of each ▲; then the abnormal score, and that
    the verdict is screening's."""
    _ = gettext_for(language)
    lines = [_(CLINICIAN_HEADING), _(CLINICIAN_MARKS)]
    for finding in sorted(result.findings, key=lambda f: f.margin, reverse=True):
        mark = "▲ " if finding.positive else ""
        facts = [isolate(_percent(finding.probability, 1 if finding.probability < 0.1 else 0), language)]
        if finding.threshold is not None:
            facts.append(fill(_("point {p}"), language, p=_percent(finding.threshold, 1)))
        if finding.sensitivity is not None and finding.specificity is not None:
            facts.append(fill(_("sens {sens} / spec {spec}"), language, sens=_percent(finding.sensitivity),
                              spec=_percent(finding.specificity)))
        if finding.positive and finding.ppv is not None:
            facts.append(fill(_(PPV), language, ppv=_percent(finding.ppv)))
        if finding.auc is not None:
            facts.append(isolate(f"AUC {finding.auc:.2f}", language))
        lines.append(f"• {mark}{finding_name(finding.label, language)}: " + "; ".join(facts))
    if result.abnormal_probability is not None:
        point = result.verdict_point or {}
        line = fill(_("Any finding (abnormal score): {p}"), language, p=_percent(result.abnormal_probability))
        if point.get("threshold") is not None:
            line += "; " + fill(_("point {p}"), language, p=_percent(point["threshold"], 1))
        lines.append(line)
    if result.verdict != "unsure":
        lines.append(_(CLINICIAN_VERDICT))
    return lines


def _of_ten(share: float | None) -> int | None:
    return None if share is None else math.floor(10 * share + 0.5)  # half up, not to even


def _sentence(text: str) -> str:
    """A sentence that may start with a body part's name: capital first letter."""
    return text[:1].upper() + text[1:]


def _percent(value: float | None, digits: int = 0) -> str:
    return "?" if value is None else f"{value:.{digits}%}"
