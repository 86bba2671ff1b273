"""No finding is ever called "normal", in any language (issue #22, words).

"Looks normal … Pleural effusion" is what a worried person remembers, whatever caveat follows. Every
reply the renderer can give is rendered in every shipped language, from a no-flag screening reply to
a clinician list; no line that names a finding may hold that language's word for "normal" (the
finding's own one-line meaning, "larger than usual", is taken out first: it describes the finding).
The catalogs are checked too: no translation of a text that takes finding names (``{names}``,
``{name}``, ``{list}``) holds the word.
"""

from __future__ import annotations

import re

import pytest
from babel.messages.pofile import read_po

from contract.i18n import FSI, LANGUAGES, PDI, RLM
from diagnosis.messages import FINDINGS, LOCALES_DIR, URGENT_MEANING, finding_name, gettext_for, render_reply
from diagnosis.report import DiagnosisResult, Finding

# Each language's word(s) for "normal" (and "healthy"), matched at the start of a word, so that
# "abnormal", "ненормальный", "ғайримуқаррарӣ", "غیرطبیعی", "असामान्य" do not count.
NORMAL = {
    "en": ["normal"], "ru": ["норм"], "kk": ["қалыпты"], "uz": ["normal", "me'yor", "me’yor", "me‘yor"],
    "ky": ["нормал", "калыптуу"], "tg": ["муқаррар", "нормал", "меъёр"], "fa": ["طبیعی", "نرمال", "سالم"],
    "ar": ["طبيعي", "سليم"], "hi": ["सामान्य", "नॉर्मल"], "id": ["normal"], "pt": ["normal", "sem alteraç"],
    "es": ["normal", "sin alteraci"], "fr": ["normal", "sans anomalie"],
}
assert set(NORMAL) == set(LANGUAGES)


def normal_word(language: str) -> re.Pattern:
    return re.compile(r"(?<![\w\u0900-\u097f])(" + "|".join(map(re.escape, NORMAL[language])) + ")", re.IGNORECASE)


def _finding(label: str, p: float, positive: bool = False, threshold: float | None = 0.3, **figures) -> Finding:
    return Finding(label=label, probability=p, positive=positive, threshold=threshold, eligible=True, **figures)


ALL = list(FINDINGS)
NOTHING_FLAGGED = [_finding(label, 0.05) for label in ALL]
ONE_FLAGGED = [_finding("Effusion", 0.6, True, ppv=0.3, sensitivity=0.4, specificity=0.9, auc=0.8),
               *[_finding(label, 0.05) for label in ALL if label != "Effusion"]]
URGENT = [_finding("Pneumothorax", 0.9, True, ppv=0.6, urgent=True), *NOTHING_FLAGGED[:3]]
POINT = {"threshold": 0.6, "sensitivity": 0.3, "specificity": 0.9, "ppv": 0.6}


def replies() -> list[DiagnosisResult]:
    analysed = dict(outcome="analysed", is_xray=True, body_part="chest", verdict_point=POINT,
                    heatmap_labels=["Effusion"], abnormal_probability=0.2)
    results = [DiagnosisResult(**analysed, findings=findings, verdict=verdict, mode=mode)
               for findings in (NOTHING_FLAGGED, ONE_FLAGGED, URGENT)
               for verdict in ("no_strong_sign", "see_doctor", "urgent", "unsure")
               for mode in ("screening", "clinician")]
    results += [DiagnosisResult(outcome=outcome, is_xray=True, body_part="hand", analysable_parts=["chest"])
                for outcome in ("body_part_not_analysed", "body_part_unknown", "body_part_uncertain")]
    results += [DiagnosisResult(outcome="not_xray", modality=m) for m in (None, "ct", "non_medical")]
    return results


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_no_reply_calls_a_finding_normal(language):
    _ = gettext_for(language)
    names = [finding_name(label, language).replace(RLM, "") for label in ALL]
    meanings = [_(meaning) for _name, meaning in FINDINGS.values()] + [_(m) for m in URGENT_MEANING.values()]
    pattern = normal_word(language)
    checked = 0
    for result in replies():
        for line in render_reply(result, language).splitlines():
            plain = line.replace(FSI, "").replace(PDI, "").replace(RLM, "")
            if not any(name in plain for name in names):
                continue
            for meaning in meanings:
                plain = plain.replace(meaning.replace(RLM, ""), "")
            checked += 1
            assert not pattern.search(plain), f"{language}: a finding called normal: {line!r}"
    assert checked >= 20  # the no-flag lines, the flagged lines and every clinician line were looked at


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_no_catalog_text_about_findings_says_normal(language):
    with (LOCALES_DIR / language / "LC_MESSAGES" / "diagnosis.po").open("rb") as handle:
        catalog = read_po(handle, locale=language, domain="diagnosis")
    pattern = normal_word(language)
    bad = [m.id for m in catalog if m.id and isinstance(m.id, str)
           and re.search(r"\{(names|name|list)\}", m.id) and pattern.search(m.string or m.id)]
    assert not bad, f"{language}: {bad}"


def test_the_check_has_teeth():
    """The texts this replaced would have failed."""
    assert normal_word("en").search("Looks normal for what this model checks reliably: Pleural effusion.")
    assert normal_word("ru").search("снимок выглядит нормальным: Плевральный выпот.")
    assert normal_word("fa").search("طبیعی به نظر می‌رسد")
    assert not normal_word("fa").search("غیرطبیعی")
    assert not normal_word("en").search("misses about 7 of 10 abnormal films")
    assert not normal_word("hi").search("असामान्य")


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_nothing_flagged_says_no_clear_sign_then_that_the_check_misses_many(language):
    """In that order, in one sentence, with the names in it; and in every language."""
    from diagnosis.messages import NO_CLEAR_SIGN

    result = DiagnosisResult(outcome="analysed", is_xray=True, body_part="chest", verdict="no_strong_sign",
                             verdict_point=POINT, findings=NOTHING_FLAGGED[:2])
    text = render_reply(result, language)
    names = ", ".join(finding_name(f.label, language) for f in NOTHING_FLAGGED[:2])
    line = next(line for line in text.splitlines() if finding_name("Atelectasis", language) in line)
    assert names in line.replace(FSI, "").replace(PDI, "")
    if language != "en":
        assert gettext_for(language)(NO_CLEAR_SIGN) != NO_CLEAR_SIGN
