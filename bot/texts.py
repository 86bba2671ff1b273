"""Translations of the ``bot`` gettext domain (bot and worker conversation texts).

Usage inside a handler: ``_, ngettext = translator(language)`` then ``_("English text")``; the
literal strings are what the catalog test extracts, so always call ``_`` / ``ngettext`` on literals.
"""

from __future__ import annotations

from collections.abc import Callable

from diagnosis.i18n import DEFAULT_LANGUAGE, LANGUAGES, pick_language, translations

DOMAIN = "bot"

__all__ = ["DEFAULT_LANGUAGE", "DOMAIN", "LANGUAGES", "translator"]


def translator(language: str | None) -> tuple[Callable[[str], str], Callable[[str, str, int], str]]:
    """(gettext, ngettext) of the ``bot`` domain for a supported language (unknown → English)."""
    catalog = translations(pick_language(language), DOMAIN)
    return catalog.gettext, catalog.ngettext
