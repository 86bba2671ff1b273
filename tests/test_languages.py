"""Every shipped language: complete catalogs, the English placeholders, Babel's plural rules, a real
rendered reply each (printed: ``pytest -s tests/test_languages.py -k rendered``), right-to-left
isolates for Persian and Arabic, and the language chosen from Telegram's tag or ``--language``."""

from __future__ import annotations

import gettext
import re
import unicodedata
from pathlib import Path

import pytest
from babel import Locale
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from contract import texts
from contract.i18n import FSI, LANGUAGES, PDI, RLM, RTL, accepted_language, pick_language
from diagnosis.messages import overlay_caption, render_reply
from diagnosis.report import DiagnosisResult, Finding

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {"bot": (ROOT / "contract" / "locales", ("bot", "worker", "contract")),
           "diagnosis": (ROOT / "diagnosis" / "locales", ("diagnosis",))}
TRANSLATED = sorted(set(LANGUAGES) - {"en"})
CATALOGS = [(domain, language) for domain in DOMAINS for language in TRANSLATED]
PLACEHOLDER = re.compile(r"\{[a-z_]*\}|%\([a-z_]+\)[sd]")
BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def catalog(domain: str, language: str):
    with (DOMAINS[domain][0] / language / "LC_MESSAGES" / f"{domain}.po").open("rb") as handle:
        return read_po(handle, locale=language, domain=domain, abort_invalid=True)


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


# ----------------------------------------------------------------------------- the catalogs
def test_every_language_has_both_catalogs_and_no_catalog_is_unshipped():
    for domain, (folder, _sources) in DOMAINS.items():
        on_disk = {path.parents[1].name for path in folder.glob(f"*/LC_MESSAGES/{domain}.po")}
        assert on_disk == set(LANGUAGES), domain


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_the_english_template_has_every_string_of_the_source(domain):
    """The en catalog is the template the others follow: nothing marked in the code may be missing from it."""
    _folder, sources = DOMAINS[domain]
    template = catalog(domain, "en")
    missing = []
    for source in sources:
        for _file, _line, message, _comments, _context in extract_from_dir(ROOT / source):
            msgid = message[0] if isinstance(message, tuple) else message
            if msgid and template.get(msgid) is None:
                missing.append(msgid[:70])
    assert not missing, missing


@pytest.mark.parametrize(("domain", "language"), CATALOGS)
def test_catalog_is_complete_and_keeps_the_placeholders(domain, language):
    """No msgid without msgstr, no fuzzy entry, none missing or left over, every plural form filled,
    and each msgstr has exactly the placeholders of its English msgid (and formats)."""
    template, translated = catalog(domain, "en"), catalog(domain, language)
    problems = []
    ids = {m.id if isinstance(m.id, str) else m.id[0] for m in template if m.id}
    extra = [m.id for m in translated if m.id and (m.id if isinstance(m.id, str) else m.id[0]) not in ids]
    problems += [f"not in the template: {e!r}" for e in extra]
    problems += [f"obsolete entry: {key!r}" for key in translated.obsolete]
    for source in template:
        if not source.id:
            continue
        entry = translated.get(source.id)
        if entry is None:
            problems.append(f"missing: {source.id!r}")
            continue
        strings = entry.string if isinstance(entry.string, tuple) else (entry.string,)
        if entry.fuzzy:
            problems.append(f"fuzzy: {source.id!r}")
        if not all(s.strip() for s in strings):
            problems.append(f"empty: {source.id!r}")
        if isinstance(source.id, tuple) and len(strings) != translated.num_plurals:
            problems.append(f"{len(strings)} plural forms, needs {translated.num_plurals}: {source.id!r}")
        wanted = set().union(*(placeholders(i) for i in (source.id if isinstance(source.id, tuple) else [source.id])))
        for string in strings:
            if placeholders(string) != wanted:
                problems.append(f"placeholders {sorted(placeholders(string))} ≠ {sorted(wanted)}: {string[:60]!r}")
            try:
                string.format(**{p.strip("{}"): 1 for p in wanted if p.startswith("{")})
            except (KeyError, IndexError, ValueError) as error:
                problems.append(f"does not format ({error!r}): {string[:60]!r}")
        if any(c in s for s in strings for c in BIDI_CONTROLS):
            problems.append(f"direction marks belong in contract.i18n, not in the catalog: {source.id!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("domain", "language"), [(d, language) for d in DOMAINS for language in LANGUAGES])
def test_plural_forms_header_follows_babels_rules(domain, language):
    """The header's Plural-Forms chooses, for every whole number, the form of Babel's (CLDR) category:
    forms are numbered in CLDR's order (zero, one, two, few, many, other) of the categories the
    language has. Checked on 0…2000 and on millions (French, Spanish, Portuguese "many")."""
    translated = catalog(domain, language)
    header = translated.mime_headers
    plural_forms = dict(header)["Plural-Forms"]
    nplurals = int(re.search(r"nplurals=(\d+)", plural_forms).group(1))
    expression = re.search(r"plural=(.*?);?\s*$", plural_forms).group(1)
    choose = gettext.c2py(expression)
    rule = Locale.parse(language).plural_form
    order = [tag for tag in ("zero", "one", "two", "few", "many", "other") if tag in rule.tags or tag == "other"]
    numbers = [*range(2001), *(k * 1_000_000 for k in (1, 2, 5)), 1_000_001, 10**9]
    wrong = [(n, choose(n), rule(n)) for n in numbers if choose(n) >= nplurals or order[choose(n)] != rule(n)]
    assert not wrong, f"{language}: {plural_forms} disagrees with {rule.rules} at {wrong[:5]}"
    assert translated.num_plurals == nplurals
    # every form the header can choose is reachable by some whole number: no dead msgstr[n]
    assert {choose(n) for n in numbers} == set(range(nplurals))


# ----------------------------------------------------------------------------- rendered replies
ANALYSED = DiagnosisResult(
    outcome="analysed", is_xray=True, body_part="chest", rectified=True, heatmap_labels=["Effusion"],
    verdict="see_doctor", verdict_point={"threshold": 0.58, "sensitivity": 0.24, "specificity": 0.85, "ppv": 0.65},
    abnormal_probability=0.71,
    findings=[Finding(label="Effusion", probability=0.81, positive=True, threshold=0.4, eligible=True, ppv=0.36,
                      sensitivity=0.25, specificity=0.95, auc=0.79),
              Finding(label="Pneumothorax", probability=0.62, positive=True, threshold=0.3, eligible=True, urgent=True,
                      ppv=0.5, sensitivity=0.6, specificity=0.97, auc=0.86),
              Finding(label="Nodule", probability=0.04, positive=False, threshold=None)])
CLINICIAN = ANALYSED.model_copy(update={"mode": "clinician"})
OTHERS = [
    DiagnosisResult(outcome="not_xray", xray_probability=0.02),
    DiagnosisResult(outcome="body_part_not_analysed", is_xray=True, body_part="knee", body_part_probability=0.97),
    DiagnosisResult(outcome="retake", retake=["too_dark", "glare"]),
    DiagnosisResult(outcome="rejected", rejection="too_large"),
    ANALYSED.model_copy(update={"verdict": "urgent"}),
    ANALYSED.model_copy(update={"verdict": "no_strong_sign", "findings": ANALYSED.findings[2:]}),
    ANALYSED.model_copy(update={"verdict": "unsure"}),
]


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_rendered_reply_in_every_language(language):
    """One screening reply per language through the real rendering code, printed to be looked at;
    every line of it is translated (none equals the English line) and it ends with the physician."""
    reply = render_reply(ANALYSED, language)
    print(f"\n===== {language} ({LANGUAGES[language]})\n{reply}\n----- caption\n"
          f"{overlay_caption('Effusion', 0.81, language)}")
    english = render_reply(ANALYSED, "en")
    assert len(reply.splitlines()) == len(english.splitlines())
    if language != "en":
        same = [line for line, en in zip(reply.splitlines(), english.splitlines(), strict=True) if line == en and line]
        assert not same, f"untranslated lines: {same}"
    assert reply.splitlines()[-1].startswith("⚕️ ")
    for result in [CLINICIAN, *OTHERS]:
        assert render_reply(result, language).strip()


@pytest.mark.parametrize("language", TRANSLATED)
def test_bot_texts_render_in_every_language(language):
    english_texts = bot_texts("en")
    for name, text in bot_texts(language).items():
        assert text.strip(), name
        assert text != english_texts[name], f"{language}: {name} is English"
    for n in [*range(0, 30), 100, 101, 111, 1_000_000]:
        assert str(n) in texts.rate_limited(language, 60 * n, n, n)


def bot_texts(language: str) -> dict[str, str]:
    return {"start": texts.start(language), "help": texts.help_text(language, 5, 600),
            "privacy": texts.privacy(language), "forget": texts.forgotten(language),
            "choose": texts.choose_language(language), "set": texts.language_set(language),
            "mode": texts.mode_set(language, "clinician", 30), "unknown mode": texts.mode_unknown(language),
            "rate": texts.rate_limited(language, 300, 3, 2), "received": texts.received(language, 2),
            "not allowed": texts.not_allowed(language, 42), "lost": texts.lost(language),
            "expired": texts.expired(language), "other": texts.other_message(language),
            "too large": texts.too_large(language)}


def test_each_language_confirms_in_itself():
    confirmations = {language: texts.language_set(language) for language in LANGUAGES}
    assert len(set(confirmations.values())) == len(LANGUAGES)


# ----------------------------------------------------------------------------- right to left
def strong_directions(line: str) -> list[str]:
    """Bidi classes of the strong characters of ``line`` outside isolates (what sets a paragraph's direction)."""
    depth, found = 0, []
    for char in line:
        if char in "\u2066\u2067\u2068":
            depth += 1
        elif char == PDI:
            depth = max(0, depth - 1)
        elif depth == 0 and unicodedata.bidirectional(char) in ("L", "R", "AL"):
            found.append(unicodedata.bidirectional(char))
    return found


def isolated(text: str) -> list[str]:
    return re.findall(f"{FSI}(.*?){PDI}", text)


@pytest.mark.parametrize("language", sorted(RTL))
def test_right_to_left_replies_isolate_numbers_and_latin(language):
    reply = render_reply(CLINICIAN, language)
    print(f"\n===== {language} clinician\n{reply!r}")
    values = isolated(reply)
    for value in ("81%", "40.0%", "25%", "95%", "AUC 0.79", "71%", "58.0%"):
        assert value in values, f"{value} not isolated in {reply!r}"
    screening = render_reply(ANALYSED, language)
    assert {"8", "7", "4"} <= set(isolated(screening))  # "about {n} of 10" counts
    assert "81%" in isolated(overlay_caption("Effusion", 0.81, language))
    assert "20" in isolated(texts.rate_limited(language, 20 * 60))
    for text in (reply, screening, texts.help_text(language, 5, 600), texts.start(language)):
        for line in filter(None, text.splitlines()):
            assert strong_directions(line)[:1] == ["R"] or strong_directions(line)[:1] == ["AL"] \
                or line.lstrip("•▲ ⚕️").startswith(RLM), f"line would be laid out left to right: {line!r}"


@pytest.mark.parametrize("language", sorted(set(LANGUAGES) - RTL))
def test_left_to_right_replies_carry_no_direction_marks(language):
    for text in (render_reply(CLINICIAN, language), texts.help_text(language, 5, 600)):
        assert not BIDI_CONTROLS & set(text)


# ----------------------------------------------------------------------------- choosing the language
@pytest.mark.parametrize(("code", "language"), [
    ("pt-BR", "pt"), ("pt-br", "pt"), ("es-419", "es"), ("fr-CA", "fr"), ("fa-IR", "fa"), ("ar-EG", "ar"),
    ("uz-Cyrl", "uz"), ("uz", "uz"), ("ky", "ky"), ("tg", "tg"), ("hi-IN", "hi"), ("id", "id"), ("in", "id"),
    ("zh-hans", "en"), ("de", "en"), ("", "en"), (None, "en"), ("kk", "kk")])
def test_telegram_language_code_falls_back_to_the_language(code, language):
    assert pick_language(code) == language


@pytest.mark.parametrize(("header", "language"), [
    ("ru-RU", "ru"), ("de;q=0.9, ru-RU, en;q=0.5", "ru"), ("de, fr;q=0.8", "fr"), ("en-US,en;q=0.9,ru;q=0.8", "en"),
    ("ru;q=0, fr;q=0.1", "fr"), ("fa;q=abc, es", "es"), ("pt-BR;q=0.4, kk;q=0.7", "kk"), ("*", "en"), ("", "en"),
    (None, "en")])
def test_http_accept_language_picks_the_highest_ranked_shipped_language(header, language):
    assert accepted_language(header) == language


def test_cli_language_accepts_regional_tags_and_refuses_unknown_ones(capsys):
    from diagnosis.cli import _parser

    assert _parser().parse_args(["x.png", "--language", "pt-BR"]).language == "pt"
    assert _parser().parse_args(["x.png", "--language", "fa"]).language == "fa"
    assert _parser().parse_args(["x.png", "--language", "en-GB"]).language == "en"
    with pytest.raises(SystemExit):
        _parser().parse_args(["x.png", "--language", "de"])
    assert "invalid choice" in capsys.readouterr().err
