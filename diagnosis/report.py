"""The typed, JSON-serialisable result of one analysis. No torch here: the bot and tools read it too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Outcome = Literal["analysed", "not_xray", "body_part_not_analysed", "body_part_uncertain", "retake", "rejected"]


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
    findings: list[Finding] = Field(default_factory=list)  # all labels, highest probability first
    abnormal_probability: float | None = None  # the model's "any finding" output; None when it has none
    heatmap_labels: list[str] = Field(default_factory=list)  # findings drawn in the overlay
    rejection: str | None = None  # ImageRejected.code when outcome == "rejected"
    retake: list[str] = Field(default_factory=list)  # quality problem codes when outcome == "retake"
    rectified: bool = False  # a photo of a film/screen was straightened and cropped before analysis
    input_format: str | None = None
    message: str = ""
    overlay: str | None = None  # path of the first written overlay (CLI); None when none was made
    overlays: list[str] = Field(default_factory=list)  # paths of every written overlay, one per drawn finding (CLI)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)  # model name → version

    @property
    def positive_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]
