"""The typed, JSON-serialisable result of one analysis. No torch here: the bot and tools read it too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Outcome = Literal["analysed", "not_xray", "body_part_not_analysed", "body_part_uncertain", "body_part_unknown",
                  "retake", "rejected"]
# What a non-X-ray image seems to be (the gate card's modality head): named in the refusal; a
# non-medical image gets no physician footer.
Modality = Literal["xray", "ct", "mri", "ultrasound", "other_medical", "non_medical"]


class Finding(BaseModel):
    label: str
    probability: float
    positive: bool  # probability ≥ the card's operating threshold for this label
    threshold: float


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
    findings: list[Finding] = Field(default_factory=list)  # all labels, highest probability first
    abnormal_probability: float | None = None  # the model's "any finding" output; None when it has none
    heatmap_labels: list[str] = Field(default_factory=list)  # findings drawn in the overlay
    rejection: str | None = None  # ImageRejected.code when outcome == "rejected"
    retake: list[str] = Field(default_factory=list)  # quality problem codes when outcome == "retake"
    rectified: bool = False  # a photo of a film/screen was straightened and cropped before analysis
    input_format: str | None = None
    message: str = ""
    overlay: str | None = None  # path of the written overlay (CLI); None when none was made
    timings_ms: dict[str, float] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)  # model name → version

    @property
    def positive_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]
