"""The web page's texts in every shipped language (``contract.i18n.LANGUAGES``), served as JSON
(``GET /v1/texts/{language}``), with the direction the page is laid out in (``dir``: ``rtl`` for
Persian and Arabic, which the page puts on its ``<html>`` element).

Whatever the service already says is taken from its catalogs: the acknowledgement and queue
position (``contract.texts``, domain ``bot``), the physician prompt, finding names, overlay colours
and rejections (``diagnosis.messages``, domain ``diagnosis``). Only the page's own controls are
new, in the domain ``web`` (``api/locales/<lang>/LC_MESSAGES/web.po``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from contract import texts as bot_texts
from contract.formats import ACCEPT, FORMAT_NAMES
from contract.i18n import LANGUAGES, N_, RTL, fill, load_catalog, pick_language

DOMAIN = "web"
LOCALES_DIR = Path(__file__).parent / "locales"

PAGE = {
    "title": N_("X-ray second opinion"),
    "intro": N_("Send a radiograph ({formats}) and get the model's estimates. A decision aid, not a diagnosis."),
    "key_label": N_("API key"),
    "key_hint": N_("Kept in this browser tab only, until you close it."),
    "key_save": N_("Use this key"),
    "key_forget": N_("Forget the key"),
    "image_label": N_("Choose or photograph an X-ray"),
    "mode_label": N_("Reply mode"),
    "mode_screening": N_("Screening"),
    "mode_clinician": N_("Clinician"),
    "language_label": N_("Language"),
    "submit": N_("Analyse"),
    "queued": N_("Waiting in the queue…"),
    "processing": N_("Analysing…"),
    "result_heading": N_("Result"),
    "findings_heading": N_("Model estimates"),
    "overlays_heading": N_("Heat maps"),
    "flagged": N_("flagged"),
    "error_heading": N_("Not analysed"),
    "key_missing": N_("Please enter your API key first."),
    "again": N_("Analyse another image"),
}


def gettext_for(language: str):
    return load_catalog(LOCALES_DIR, pick_language(language), DOMAIN).gettext


@cache
def page_texts(language: str) -> dict[str, object]:
    """Every text the page shows, in one language (unknown → English)."""
    from diagnosis.messages import FINDINGS, OVERLAY_COLOURS, PHYSICIAN
    from diagnosis.messages import gettext_for as diagnosis_gettext

    language = pick_language(language)
    _ = gettext_for(language)
    d_ = diagnosis_gettext(language)
    strings: dict[str, object] = {key: fill(_(text), language, formats=FORMAT_NAMES) if "{formats}" in text else
                                  _(text) for key, text in PAGE.items()}
    strings.update({
        "language": language,
        "accept": ACCEPT,  # the file picker's formats
        "dir": "rtl" if language in RTL else "ltr",
        "languages": dict(LANGUAGES),
        "received": bot_texts.received(language, 0),
        "physician": d_(PHYSICIAN),
        "overlay_colours": d_(OVERLAY_COLOURS),
        "service_unavailable": bot_texts.service_unavailable(language),
        "internal_error": bot_texts.internal_error(language),
        "findings": {label: d_(names[0]) for label, names in FINDINGS.items()},
    })
    return strings
