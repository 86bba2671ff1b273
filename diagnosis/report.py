"""The typed, JSON-serialisable result of one analysis. No torch here: the bot and tools read it too."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from contract.envelope import Mode

Outcome = Literal["analysed", "not_xray", "body_part_not_analysed", "body_part_uncertain", "body_part_unknown",
                  "retake", "rejected"]
# What a non-X-ray image seems to be (the gate card's modality head): named in the refusal; a
# non-medical image gets no physician footer.
Modality = Literal["xray", "ct", "mri", "ultrasound", "other_medical", "non_medical"]


# no_strong_sign: nothing the model checks reliably crossed its point; see_doctor: signs worth showing
# a doctor soon; urgent: a flagged label whose PPV justifies it; unsure: the card has no validated points.
Verdict = Literal["no_strong_sign", "see_doctor", "urgent", "unsure"]


class Finding(BaseModel):
    label: str
    probability: float  # calibrated (Platt, fitted on val) when the card has a calibration
    positive: bool  # flagged in the result's mode: probability ≥ this label's operating point
    threshold: float | None  # the mode's operating point; None: never flagged in this mode
    # Figures of that point, measured on the val split (card ``operating_points``); None when unknown.
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None  # at the val prevalence of the label
    auc: float | None = None
    eligible: bool = False  # screening: the model is good enough at this label to flag it to anyone
    urgent: bool = False  # flagged, and its PPV at the point justifies urgent wording (card rule)

    @property
    def margin(self) -> float:
        """How far the estimate is above (> 0) or below (< 0) its point, in log-odds: the order of the
        clinician list. A finding without a point comes last."""
        if self.threshold is None:
            return -math.inf
        return _log_odds(self.probability) - _log_odds(self.threshold)


def _log_odds(p: float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return math.log(p) - math.log1p(-p)


class DiagnosisResult(BaseModel):
    """What the pipeline found.

    ``message`` is empty from the pipeline; the edge that shows the result fills it with the reply
    text (``diagnosis.messages.render_reply``), e.g. the CLI for ``--json``.
    """

    file: str | None = None
    outcome: Outcome
    is_xray: bool = False
    xray_probability: float | None = None
    body_part: str | None = None
    body_part_probability: float | None = None
    # Open-set distance of the film to the nearest body part the model knows (body-part card's
    # open_set); above the card's threshold the outcome is "body_part_unknown". None without one.
    body_part_novelty: float | None = None
    modality: Modality | None = None  # gate card's modality head, when it has one
    # All labels: screening, highest probability first; clinician, highest relative to its point first
    # (``Finding.margin``).
    findings: list[Finding] = Field(default_factory=list)
    abnormal_probability: float | None = None  # calibrated "any finding" score; None when the card has none
    mode: Mode = "screening"
    verdict: Verdict | None = None  # set for analysed results (diagnosis.operating)
    # The verdict's point and its val figures: threshold, sensitivity, specificity, ppv.
    verdict_point: dict[str, float | None] = Field(default_factory=dict)
    heatmap_labels: list[str] = Field(default_factory=list)  # findings drawn in the overlay
    # Body parts this service has an abnormality model for (from the cards present), for the reply to
    # a film it does not analyse; empty from older workers and hand-made results.
    analysable_parts: list[str] = Field(default_factory=list)
    # Parallel to heatmap_labels: each overlay's hottest red point [x, y] in the pixels of the image
    # as it was sent (through the photo step's crop and an upright turn, mapped back); None when the
    # overlay shows no red (e.g. a finding drawn although it was not flagged: its red is not drawn).
    peaks: list[list[int] | None] = Field(default_factory=list)
    rejection: str | None = None  # ImageRejected.code when outcome == "rejected"
    retake: list[str] = Field(default_factory=list)  # quality problem codes when outcome == "retake"
    rectified: bool = False  # a photo of a film/screen was straightened and cropped before analysis
    # The picture is a phone photo (colour, or a film was found in it: diagnosis.photo.models_view)
    # rather than a digital file; a retake asks for a better photo only then (a file is asked for
    # again as the original), and only a photo is asked about glare.
    photographed: bool = False
    # The picture arrived turned by this many degrees (counter-clockwise: 90, 180, 270) and was turned
    # back upright before the models read it (gate card's orientation head); 0: read as sent.
    turned: int = 0
    input_format: str | None = None
    message: str = ""
    overlay: str | None = None  # path of the first written overlay (CLI); None when none was made
    overlays: list[str] = Field(default_factory=list)  # paths of every written overlay, one per drawn finding (CLI)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)  # model name → version
    # model name → sha256 of its card.json: identifies the exact model (algorithm identification of
    # the DICOM SR, the PDF report); empty from callers that build results by hand.
    model_cards: dict[str, str] = Field(default_factory=dict)

    @property
    def positive_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]
