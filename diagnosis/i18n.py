"""gettext catalogs for every user-facing string (English source, Russian and Kazakh translations).

Catalogs are plain ``.po`` files under ``diagnosis/locales/<lang>/LC_MESSAGES/<domain>.po``; Babel
compiles them in memory at first use, so no build step and no binary files in the repo.
Domains: ``diagnosis`` (result texts, shared by CLI and worker) and ``bot`` (bot conversation).
"""

from __future__ import annotations

import gettext
import io
from functools import cache
from pathlib import Path

LOCALES_DIR = Path(__file__).parent / "locales"
LANGUAGES = {"en": "English", "ru": "Русский", "kk": "Қазақша"}
DEFAULT_LANGUAGE = "en"


def pick_language(code: str | None) -> str:
    """Telegram ``language_code`` (e.g. "ru", "kk", "en-GB") → a supported language."""
    base = (code or "").split("-")[0].split("_")[0].lower()
    return base if base in LANGUAGES else DEFAULT_LANGUAGE


@cache
def translations(language: str, domain: str = "diagnosis") -> gettext.NullTranslations:
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    path = LOCALES_DIR / language / "LC_MESSAGES" / f"{domain}.po"
    if not path.is_file():
        return gettext.NullTranslations()
    with path.open("rb") as handle:
        catalog = read_po(handle, locale=language, domain=domain)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def gettext_for(language: str, domain: str = "diagnosis"):
    """The ``_`` function for one language."""
    return translations(pick_language(language), domain).gettext


def N_(message: str) -> str:
    return message
