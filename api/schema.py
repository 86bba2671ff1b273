"""The documented shapes (OpenAPI): the analysis document (schema version 1) and a problem.

``result`` is ``diagnosis.report.DiagnosisResult``: the same keys as ``xray-diagnose --json``, with
``message`` rendered in the request's language and ``overlay``/``overlays`` as overlay URLs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from contract.envelope import Mode
from contract.i18n import LANGUAGES
from diagnosis.report import DiagnosisResult

# Every shipped language (the request's ``language`` field takes the same list).
Language = Literal[tuple(LANGUAGES)]  # type: ignore[valid-type]


class Overlay(BaseModel):
    n: int
    label: str
    url: str
    caption: str  # localized: the finding, its estimate, what red and blue mean


class AnalysisError(BaseModel):
    code: Literal["expired", "apology", "lost"]
    detail: str  # localized, for a person


class Analysis(BaseModel):
    schema_version: Literal["1"]
    id: str
    url: str
    status: Literal["queued", "processing", "succeeded", "failed"]
    mode: Mode
    language: Language
    created_at: str
    completed_at: str | None
    result: DiagnosisResult | None  # status succeeded
    overlays: list[Overlay]
    error: AnalysisError | None  # status failed


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    code: str | None = None  # image refusals: diagnosis.intake.ImageRejected codes
