"""gettext machinery for every user-facing string (English source, Russian and Kazakh translations).

Catalogs are plain ``.po`` files, ``<locales>/<lang>/LC_MESSAGES/<domain>.po``; Babel compiles them
in memory at first use, so no build step and no binary files in the repo. Two domains:
``diagnosis`` (result texts, ``diagnosis/locales``, used by ``diagnosis.messages``) and ``bot``
(the conversation, ``contract/locales``, used by ``contract.texts``).
"""

from __future__ import annotations

import gettext
import io
from functools import cache
from pathlib import Path

LANGUAGES = {"en": "English", "ru": "Русский", "kk": "Қазақша"}
DEFAULT_LANGUAGE = "en"


def pick_language(code: str | None) -> str:
    """Telegram ``language_code`` (e.g. "ru", "kk", "en-GB") → a supported language."""
    base = (code or "").split("-")[0].split("_")[0].lower()
    return base if base in LANGUAGES else DEFAULT_LANGUAGE


@cache
def load_catalog(locales_dir: Path, language: str, domain: str) -> gettext.NullTranslations:
    """The compiled catalog of one domain and language (none on disk: the English source)."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    path = Path(locales_dir) / language / "LC_MESSAGES" / f"{domain}.po"
    if not path.is_file():
        return gettext.NullTranslations()
    with path.open("rb") as handle:
        catalog = read_po(handle, locale=language, domain=domain)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def N_(message: str) -> str:
    """Marks a literal for extraction; translated later, where the language is known."""
    return message
