import pytest
from babel.messages.extract import extract_from_dir

from contract.i18n import LANGUAGES, pick_language
from diagnosis.messages import apology, gettext_for, render_reply
from diagnosis.report import DiagnosisResult, Finding

PHYSICIAN = {"en": "physician", "ru": "врачу", "kk": "дәрігерге"}


def extracted(folder: str) -> set[str]:
    return {m[2] for m in extract_from_dir(folder, keywords={"_": None, "N_": None}) if isinstance(m[2], str)}


@pytest.mark.parametrize("language", ["ru", "kk"])
def test_diagnosis_catalog_translates_every_string(language):
    _ = gettext_for(language)
    missing = [m for m in extracted("diagnosis") if _(m) == m and m.strip()]
    assert missing == [], f"{language} catalog misses {missing}"


RESULTS = [
    DiagnosisResult(outcome="not_xray", xray_probability=0.02),
    DiagnosisResult(outcome="body_part_uncertain", is_xray=True, body_part_probability=0.3),
    DiagnosisResult(outcome="body_part_not_analysed", is_xray=True, body_part="hand", body_part_probability=0.97),
    DiagnosisResult(outcome="rejected", rejection="corrupt"),
    DiagnosisResult(outcome="analysed", is_xray=True, body_part="chest", findings=[
        Finding(label="Effusion", probability=0.81, positive=True, threshold=0.4),
        Finding(label="Nodule", probability=0.2, positive=False, threshold=0.3)], heatmap_labels=["Effusion"]),
]


@pytest.mark.parametrize("language", list(LANGUAGES))
@pytest.mark.parametrize("result", RESULTS, ids=lambda r: r.outcome)
def test_every_reply_ends_with_the_physician_prompt(result, language):
    text = render_reply(result, language)
    assert PHYSICIAN[language] in text.splitlines()[-1]


def test_positive_findings_come_first_with_meaning():
    text = render_reply(RESULTS[-1], "en")
    assert text.index("Pleural effusion — 81%") < text.index("Nodule 20%")
    assert "fluid around a lung" in text


def test_russian_and_kazakh_replies_are_translated():
    assert "грудной клетки" in render_reply(RESULTS[-1], "ru")
    assert "Кеуде" in render_reply(RESULTS[-1], "kk")
    assert "кисти" in render_reply(RESULTS[2], "ru")


def test_apology_urges_a_physician():
    assert "physician" in apology("en") and "врачу" in apology("ru")


@pytest.mark.parametrize(("code", "language"), [("ru", "ru"), ("kk-KZ", "kk"), ("en-GB", "en"), (None, "en"),
                                                ("de", "en")])
def test_language_from_telegram_code(code, language):
    assert pick_language(code) == language
