from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir

from contract.i18n import LANGUAGES, pick_language
from diagnosis.messages import PHYSICIAN as PROMPT
from diagnosis.messages import PHYSICIAN_UNREAD, UNREAD_MEDICAL, apology, gettext_for, render_reply
from diagnosis.report import DiagnosisResult, Finding

PHYSICIAN = {"en": "physician", "ru": "врачу", "kk": "дәрігерге", "uz": "shifokorga", "ky": "дарыгерге",
             "tg": "духтур", "fa": "پزشک", "ar": "طبيب", "hi": "डॉक्टर", "id": "dokter", "pt": "médico",
             "es": "médico", "fr": "médecin"}


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
    DiagnosisResult(outcome="body_part_not_analysed", is_xray=True, body_part="hand", body_part_probability=0.97,
                    analysable_parts=["chest"]),
    DiagnosisResult(outcome="rejected", rejection="corrupt"),
    DiagnosisResult(outcome="not_xray", xray_probability=0.01, modality="ct"),
    DiagnosisResult(outcome="not_xray", xray_probability=0.01, modality="other_medical"),
    DiagnosisResult(outcome="body_part_unknown", is_xray=True, body_part_probability=0.9, body_part_novelty=5000.0),
    DiagnosisResult(outcome="analysed", is_xray=True, body_part="chest", findings=[
        Finding(label="Effusion", probability=0.81, positive=True, threshold=0.4, eligible=True, ppv=0.36,
                sensitivity=0.25, specificity=0.95, auc=0.79),
        Finding(label="Nodule", probability=0.2, positive=False, threshold=None)], heatmap_labels=["Effusion"],
        verdict="see_doctor", verdict_point={"threshold": 0.58, "sensitivity": 0.24, "specificity": 0.85, "ppv": 0.65}),
]


@pytest.mark.parametrize("language", list(LANGUAGES))
@pytest.mark.parametrize("result", RESULTS, ids=lambda r: f"{r.outcome}-{r.modality}")
def test_the_physician_prompt_ends_a_reading_and_only_a_reading(result, language):
    """The prompt says "show the image and this result to a physician": it follows a reading only.
    A radiograph recognised but not read, and a medical image that is not an X-ray, end with their own
    line sending the image to a physician; a corrupt file or an image that is not medical gets none."""
    text = render_reply(result, language)
    last = text.splitlines()[-1]
    unread_medical = result.outcome in UNREAD_MEDICAL or result.modality in ("ct", "other_medical")
    if result.outcome == "analysed":
        assert PHYSICIAN[language] in last and last.startswith("⚕️ ")
    elif unread_medical:
        assert last == "⚕️ " + gettext_for(language)(PHYSICIAN_UNREAD) and PHYSICIAN[language] in last
        assert gettext_for(language)(PROMPT) not in text
    else:
        assert gettext_for(language)(PROMPT) not in text and "⚕" not in text


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_retake_and_analysed_photo_prompt(language):
    retake = DiagnosisResult(outcome="retake", is_xray=True, retake=["blurred"], rectified=True)
    assert gettext_for(language)(PROMPT) not in render_reply(retake, language)
    reading = RESULTS[-1].model_copy(update={"mode": "clinician"})
    assert render_reply(reading, language).splitlines()[-1].startswith("⚕️ ")


def test_other_part_says_what_it_is_and_what_can_be_read_without_probabilities():
    hand = RESULTS[2]
    assert render_reply(hand, "en").splitlines() == ["I recognised an X-ray of the hand.",
                                                     "So far I can only analyse X-rays of the chest.", "",
                                                     "⚕️ I have not analysed this image. Please show it to a "
                                                     "physician."]
    assert "%" not in render_reply(hand, "ru") and "кисти" in render_reply(hand, "ru")
    assert "грудной клетки" in render_reply(hand, "ru").splitlines()[1]
    # the list comes from the result (the abnormality cards present), not from the text
    two = hand.model_copy(update={"analysable_parts": ["chest", "knee"]})
    assert render_reply(two, "en").splitlines()[1] == "So far I can only analyse X-rays of the chest, knee."
    older = hand.model_copy(update={"analysable_parts": []})  # a result from a worker before the field
    assert render_reply(older, "en").splitlines()[1] == "I cannot analyse X-rays of this body part yet."
    for outcome in ("body_part_unknown", "body_part_uncertain"):
        text = render_reply(DiagnosisResult(outcome=outcome, is_xray=True, body_part_probability=0.9,
                                            analysable_parts=["chest"]), "en")
        assert "So far I can only analyse X-rays of the chest." in text.splitlines() and "%" not in text
    not_xray = render_reply(DiagnosisResult(outcome="not_xray", xray_probability=0.02), "en")
    assert not_xray.startswith("This does not look like an X-ray image.") and "%" not in not_xray


def test_screening_reply_gives_the_verdict_first_and_only_flagged_reliable_labels():
    lines = render_reply(RESULTS[-1], "en").splitlines()
    assert lines[1] == "Verdict: signs worth showing a doctor soon."
    text = "\n".join(lines)
    assert "misses about 8 of 10 abnormal films" in text  # 1 − sensitivity 0.24, in plain words
    assert "about 7 of 10 such films do have a finding" in text  # PPV 0.65
    assert "Pleural effusion: there may be fluid around a lung (about 4 of 10" in text
    assert "Nodule" not in text and "urgent" not in text.lower()


def test_clinician_reply_lists_every_label_with_its_point():
    result = RESULTS[-1].model_copy(update={"mode": "clinician"})
    text = render_reply(result, "en")
    assert "• ▲ Pleural effusion: 81%; point 40.0%; sens 25% / spec 95%; PPV 36%; AUC 0.79" in text
    assert "• Nodule: 20%" in text
    low = result.model_copy(update={"findings": [Finding(label="Hernia", probability=0.004, positive=False,
                                                         threshold=0.001)]})
    assert "• Hiatal hernia: 0.4%; point 0.1%" in render_reply(low, "en")  # small values keep a decimal
    assert text.index("Verdict") < text.index("Pleural effusion")
    assert "The verdict above is the one screening mode gives" in text


def test_clinician_list_is_ordered_by_estimate_relative_to_its_point():
    findings = [Finding(label="Infiltration", probability=0.30, positive=False, threshold=0.35),
                Finding(label="Hernia", probability=0.004, positive=True, threshold=0.002, ppv=0.05),
                Finding(label="Nodule", probability=0.05, positive=False, threshold=0.2),
                Finding(label="Mass", probability=0.2, positive=False, threshold=None)]
    result = RESULTS[-1].model_copy(update={"mode": "clinician", "findings": findings})
    listed = [line for line in render_reply(result, "en").splitlines() if line.startswith("• ")]
    assert [line.split(":")[0] for line in listed] == ["• ▲ Hiatal hernia", "• Infiltration", "• Nodule", "• Mass"]
    assert "PPV 5%" in listed[0] and "PPV" not in listed[1]  # the PPV of each ▲ only


def test_album_caption_names_each_photo_once_and_the_rest_once():
    from diagnosis.messages import album_caption, overlay_caption

    captions = [overlay_caption("Effusion", 0.81, "en"), overlay_caption("Cardiomegaly", 0.4, "en")]
    text = album_caption(captions)
    lines = text.splitlines()
    assert lines[0] == "1. " + captions[0].splitlines()[0] and lines[1] == "2. " + captions[1].splitlines()[0]
    assert len(lines) == len(captions[0].splitlines()) + 1  # the shared lines once
    assert album_caption(captions[:1]) == captions[0]


def test_normal_screening_reply_says_what_it_checked_and_what_it_cannot_rule_out():
    normal = RESULTS[-1].model_copy(update={"verdict": "no_strong_sign", "findings": [
        Finding(label="Effusion", probability=0.1, positive=False, threshold=0.4, eligible=True),
        Finding(label="Nodule", probability=0.05, positive=False, threshold=None)]})
    text = render_reply(normal, "en")
    assert "Verdict: no strong sign" in text
    assert "No clear sign of Pleural effusion was found, but this check misses many cases, so it does not rule " \
           "them out." in text
    assert "normal" not in text.replace("abnormal", "") and "Nodule" not in text


def test_card_without_operating_points_is_unsure():
    unsure = RESULTS[-1].model_copy(update={"verdict": "unsure", "verdict_point": {}})
    assert "Verdict: unsure" in render_reply(unsure, "en")


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_non_medical_refusal_is_polite_and_has_no_physician_footer(language):
    text = render_reply(DiagnosisResult(outcome="not_xray", xray_probability=0.01, modality="non_medical"), language)
    assert PHYSICIAN[language] not in text and "⚕" not in text
    assert text.splitlines()[0] == gettext_for(language)(
        "Sorry, this does not look like an X-ray image, and X-ray radiographs are all I can read.")


@pytest.mark.parametrize(("modality", "name"), [("ct", "CT scan"), ("mri", "MRI scan"), ("ultrasound", "ultrasound")])
def test_ct_mri_and_ultrasound_are_named(modality, name):
    text = render_reply(DiagnosisResult(outcome="not_xray", xray_probability=0.01, modality=modality))
    assert name in text.splitlines()[0] and "only read X-ray" in text
    assert "КТ" in render_reply(DiagnosisResult(outcome="not_xray", modality="ct"), "ru")


def test_unknown_body_part_is_not_named():
    result = DiagnosisResult(outcome="body_part_unknown", is_xray=True, body_part_probability=0.99)
    text = render_reply(result, "en")
    assert "body part I cannot read yet" in text and "99%" not in text
    assert "не умею читать" in render_reply(result, "ru")


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


# ----------------------------------------------------------------------------- vocabulary from the cards
def shipped_cards():
    from conftest import ROOT

    from diagnosis.cards import CARD_FILE, read_card

    models = ROOT / "models"
    return [read_card(folder, verify=False) for folder in sorted(models.iterdir()) if (folder / CARD_FILE).is_file()]


def words_of_the_cards() -> dict[str, str]:
    """Every msgid a reply may need for the shipped cards, with what needs it; unknown names fail here."""
    from diagnosis.messages import BODY_PARTS, FINDINGS

    needed: dict[str, str] = {}
    problems = []
    for card in shipped_cards():
        parts = card.labels if card.role == "body_part" else [card.body_part] if card.role == "abnormality" else []
        for part in parts:
            if part not in BODY_PARTS:
                problems.append(f"{card.name}: body part {part!r} has no entry in diagnosis.messages.BODY_PARTS")
            else:
                needed[BODY_PARTS[part]] = f"{card.name}: body part {part}"
        for label in card.labels if card.role == "abnormality" else []:
            if label not in FINDINGS:
                problems.append(f"{card.name}: label {label!r} has no entry in diagnosis.messages.FINDINGS")
            else:
                name, meaning = FINDINGS[label]
                needed[name] = needed[meaning] = f"{card.name}: label {label}"
    assert not problems, "\n".join(problems)
    return needed


def test_the_shipped_cards_are_read():
    roles = {card.role for card in shipped_cards()}
    assert {"body_part", "abnormality"} <= roles


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_every_shipped_label_and_body_part_is_in_every_catalog(language):
    from babel.messages.pofile import read_po

    from diagnosis.messages import LOCALES_DIR

    with (LOCALES_DIR / language / "LC_MESSAGES" / "diagnosis.po").open("rb") as handle:
        catalog = read_po(handle, locale=language, domain="diagnosis")
    problems = []
    for msgid, needed_by in words_of_the_cards().items():
        entry = catalog.get(msgid)
        if entry is None:
            problems.append(f"{language}: no entry for {msgid!r} ({needed_by})")
        elif language != "en" and (entry.fuzzy or not entry.string.strip()):
            problems.append(f"{language}: {msgid!r} is not translated ({needed_by})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("*/locales/*/LC_MESSAGES/*.po")),
                         ids=lambda p: f"{p.parents[3].name}-{p.parents[1].name}")
def test_every_catalog_is_well_formed(path):
    """A malformed entry (e.g. a msgid without msgstr after a merge) makes babel print warnings to
    stdout, which would corrupt ``xray-diagnose --json``: refuse it here."""
    from babel.messages.pofile import read_po

    with path.open("rb") as handle:
        catalog = read_po(handle, abort_invalid=True)
    assert len(catalog) > 10
