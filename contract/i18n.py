"""gettext machinery for every user-facing string (English source and its translations).

Catalogs are plain ``.po`` files, ``<locales>/<lang>/LC_MESSAGES/<domain>.po``; Babel compiles them
in memory at first use, so no build step and no binary files in the repo. Two domains:
``diagnosis`` (result texts, ``diagnosis/locales``, used by ``diagnosis.messages``) and ``bot``
(the conversation, ``contract/locales``, used by ``contract.texts``). How to add a language:
docs/languages.md.

Right-to-left languages (``RTL``): every value formatted into a translated text goes through
``fill`` / ``isolate``, which wrap it in Unicode isolates (FSI … PDI), so that numbers, percentages
and Latin abbreviations keep their own order inside Persian or Arabic sentences; and every line of
a right-to-left translation starts with a RIGHT-TO-LEFT MARK, so that a line opening with a command
or a number ("/help – …", "81% …") is still laid out right to left. Both are done here, once, not in
the catalogs.
"""

from __future__ import annotations

import gettext
import io
from functools import cache
from pathlib import Path
from typing import Any

# Every shipped language, named in itself (the /language menu shows these names as they are).
LANGUAGES = {
    "en": "English",
    "ru": "Русский",
    "kk": "Қазақша",
    "uz": "O‘zbekcha",
    "ky": "Кыргызча",
    "tg": "Тоҷикӣ",
    "fa": "فارسی",
    "ar": "العربية",
    "hi": "हिन्दी",
    "id": "Bahasa Indonesia",
    "pt": "Português",
    "es": "Español",
    "fr": "Français",
}
DEFAULT_LANGUAGE = "en"
RTL = frozenset({"fa", "ar"})
# Codes some clients send for a shipped language (legacy or macro-language codes).
ALIASES = {"in": "id", "prs": "fa", "pes": "fa", "uzb": "uz", "kir": "ky", "tgk": "tg", "fas": "fa", "ara": "ar"}

FSI, PDI = "\u2068", "\u2069"  # FIRST STRONG ISOLATE … POP DIRECTIONAL ISOLATE
RLM = "\u200f"  # RIGHT-TO-LEFT MARK: starts every line of a right-to-left translation


def pick_language(code: str | None) -> str:
    """Telegram ``language_code`` (an IETF tag: "ru", "kk", "en-GB", "pt-br", "uz-Cyrl") → a shipped
    language: the primary subtag, so regional and script variants fall back to the language
    (``pt-BR`` → ``pt``, ``uz-Cyrl`` → ``uz``, written in Latin); unknown → English."""
    return shipped_language(code) or DEFAULT_LANGUAGE


def shipped_language(code: str | None) -> str | None:
    """The shipped language of an IETF tag's primary subtag (see ``pick_language``); None if none."""
    base = (code or "").strip().split("-")[0].split("_")[0].lower()
    base = ALIASES.get(base, base)
    return base if base in LANGUAGES else None


def accepted_language(header: str | None) -> str:
    """The shipped language an HTTP ``Accept-Language`` header ranks highest (q-values; English if none)."""
    ranked = []
    for item in (header or "").split(","):
        tag, _, params = item.partition(";")
        weight = 1.0
        if params.strip().startswith("q="):
            try:
                weight = float(params.strip()[2:])
            except ValueError:
                continue
        language = shipped_language(tag)
        if language is not None and weight > 0:
            ranked.append((-weight, len(ranked), language))
    return min(ranked)[2] if ranked else DEFAULT_LANGUAGE


def isolate(value: Any, language: str) -> str:
    """``value`` as text; in a right-to-left language wrapped in FSI … PDI, so that a number, a
    percentage or a Latin abbreviation is laid out on its own (FSI: left-to-right unless the value
    itself starts with a right-to-left letter) and does not reorder the sentence around it."""
    text = str(value)
    return f"{FSI}{text}{PDI}" if language in RTL and text else text


def fill(template: str, language: str, **values: Any) -> str:
    """``template.format(**values)``, every value isolated for right-to-left languages."""
    return template.format(**{name: isolate(value, language) for name, value in values.items()})


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
    if language in RTL:
        for message in catalog:
            if message.id and message.string:
                strings = message.string if isinstance(message.string, tuple) else (message.string,)
                marked = tuple(_rtl_lines(s) for s in strings)
                message.string = marked if isinstance(message.string, tuple) else marked[0]
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def _rtl_lines(text: str) -> str:
    """Every non-empty line of a right-to-left text begins with RLM (idempotent)."""
    return "\n".join(line if not line or line.startswith(RLM) else RLM + line for line in text.split("\n"))


def N_(message: str) -> str:
    """Marks a literal for extraction; translated later, where the language is known."""
    return message
