"""DICOM out and the PDF report (issue #25), checked with real tools: a real Orthanc (Debian's
``orthanc`` + ``orthanc-dicomweb``) on loopback, ``dciodvfy`` (dicom3tools), ``pdftotext``,
``pdfinfo`` and ``pdftoppm`` (poppler-utils). ``.ci/run`` installs them; without them a local run
skips (in CI, where ``CI`` is set, it fails instead)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ROOT, gradient
from dicom_factory import make_dicom
from PIL import Image

from contract.i18n import LANGUAGES, RTL

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
UID_ROOT = "1.2.826.0.1.3680043.10.999."
PHYSICIAN = {"en": "physician", "ru": "врачу", "kk": "дәрігерге", "uz": "shifokor", "ky": "дарыгер", "tg": "духтур",
             "id": "dokter", "pt": "médico", "es": "médico", "fr": "médecin"}
TITLE = {"en": "automated report", "ru": "автоматический отчёт", "kk": "автоматты есеп", "uz": "avtomatik hisobot",
         "ky": "автоматтык отчёт", "tg": "ҳисоботи автоматӣ", "id": "laporan otomatis", "pt": "relatório automático",
         "es": "informe automático", "fr": "rapport automatisé"}
# Shaped scripts: poppler extracts HarfBuzz-shaped Devanagari and Arabic only approximately (conjuncts
# and ligatures come apart), so their pages are checked by script, by alignment and by eye instead.
SCRIPT = {"hi": ("\u0900", "\u097f"), "fa": ("\u0600", "\u06ff"), "ar": ("\u0600", "\u06ff")}


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} missing: .ci/run installs them")
        pytest.skip(f"{missing} not installed (apt-get install orthanc orthanc-dicomweb dicom3tools poppler-utils)")


def with_study(data: bytes, **extra) -> bytes:
    """The factory's DICOM with the study/series identity a PACS files by, plus ``extra`` attributes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250102", "101500", "S1", "ACC-1"
    ds.PatientSex, ds.SeriesNumber, ds.InstanceNumber = "F", 1, 1
    for key, value in extra.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def film(pack: Path) -> np.ndarray:
    row = next(line.split(",") for line in (pack / "manifest.csv").read_text().splitlines()[1:]
               if ",test," in line and ",chest," in line and line.startswith("images/nih_cxr14/"))
    return np.asarray(Image.open(pack / row[0]).convert("L"))


def dciodvfy(path: Path) -> tuple[list[str], str]:
    """(error lines, the whole output) of dicom3tools' validator."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


@pytest.fixture(scope="module")
def fake_pipeline(fake_models):
    from diagnosis.pipeline import Pipeline

    return Pipeline.load(fake_models)


def analyse(pipeline, data: bytes, mode: str = "clinician"):
    return pipeline.run(data, file="source.dcm", mode=mode)


# ------------------------------------------------------------------ DICOM objects, bad input


def test_sr_and_sc_copy_the_study_and_get_fresh_uids(fake_pipeline, tmp_path):
    from diagnosis import dicom_out

    need("dciodvfy")
    data = with_study(make_dicom(gradient(256, 256, texture=True).astype(np.uint16) * 16, bits=12))
    analysis = analyse(fake_pipeline, data)
    assert analysis.result.outcome == "analysed" and analysis.overlays
    source = pydicom.dcmread(io.BytesIO(data))
    objects = dicom_out.build(data, analysis.result, analysis.overlays, uid_root=UID_ROOT)
    again = dicom_out.build(data, analysis.result, analysis.overlays, uid_root=UID_ROOT)
    sr, captures = objects.sr, objects.captures
    assert len(captures) == len(analysis.overlays)
    for ds in objects.all():
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName and ds.AccessionNumber == "ACC-1"
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID.startswith(UID_ROOT)
    assert len({c.SeriesInstanceUID for c in captures}) == 1 and captures[0].SeriesInstanceUID != sr.SeriesInstanceUID
    assert captures[0].SeriesDescription == "AI evidence map - not for diagnosis"
    assert captures[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    new = {ds.SOPInstanceUID for ds in objects.all()} | {ds.SeriesInstanceUID for ds in objects.all()}
    assert not new & ({ds.SOPInstanceUID for ds in again.all()} | {ds.SeriesInstanceUID for ds in again.all()})
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    for path in dicom_out.write(objects, tmp_path, "source"):
        errors, output = dciodvfy(path)
        assert errors == [], output


def test_sr_findings_are_readable_by_highdicom(fake_pipeline):
    import highdicom as hd

    from diagnosis import dicom_out

    data = with_study(make_dicom(gradient(256, 256, texture=True)))
    result = analyse(fake_pipeline, data).result
    sr = dicom_out.build(data, result, [], uid_root=None).sr
    assert sr.SOPInstanceUID.startswith("2.25.")  # no root set: UUID-derived UIDs
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1 + len(result.findings)  # the verdict, then every finding
    verdict = groups[0].get_qualitative_evaluations()[0]
    assert verdict.value == dicom_out.VERDICTS[result.verdict]
    by_meaning = {g.finding_type.meaning: g for g in groups[1:]}
    for finding in result.findings:
        group = by_meaning[dicom_out.FINDING_NAMES[finding.label]]
        [estimate] = group.get_measurements(name=dicom_out.ESTIMATE)
        assert estimate.value == pytest.approx(finding.probability, abs=1e-6)
        [flag] = group.get_qualitative_evaluations()
        assert flag.value.meaning == ("Yes" if finding.positive else "No")
        assert group.source_images[0].referenced_sop_instance_uid == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    texts: list[str] = []  # the algorithm identification names every model with its card hash
    sr.walk(lambda _ds, element: texts.append(str(element.value)) if element.keyword == "TextValue" else None)
    assert result.model_cards
    for name, sha in result.model_cards.items():
        assert f"{name} {result.models[name]} card-sha256 {sha}" in texts


@pytest.mark.parametrize("case", ["multiframe", "monochrome1", "colour", "bits16"])
def test_odd_but_readable_sources_give_valid_objects(fake_pipeline, tmp_path, case):
    from diagnosis import dicom_out

    need("dciodvfy")
    pixels = gradient(256, 256, texture=True)
    if case == "multiframe":  # Multi-frame Grayscale Byte Secondary Capture
        ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels, bits=8, frames=3)))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    elif case == "monochrome1":
        data = make_dicom(pixels.astype(np.uint16) * 256, photometric="MONOCHROME1")
    elif case == "bits16":
        data = make_dicom(pixels.astype(np.uint16) * 257, bits=16)
    else:
        ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels, bits=8)))
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = np.stack([pixels] * 3, axis=-1).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    data = with_study(data)
    analysis = analyse(fake_pipeline, data)
    objects = dicom_out.build(data, analysis.result, analysis.overlays, uid_root=UID_ROOT)
    if case == "multiframe":  # analysed on frame 1, and the SR says so
        frames: list = []
        objects.sr.walk(lambda _ds, e: frames.append(e.value) if e.keyword == "ReferencedFrameNumber" else None)
        assert frames and all(int(f) == 1 for f in frames)
    for path in dicom_out.write(objects, tmp_path, case):
        errors, output = dciodvfy(path)
        assert errors == [], output


def test_inputs_that_cannot_be_filed_are_refused_clearly(fake_pipeline):
    from diagnosis import dicom_out

    pixels = gradient(256, 256, texture=True)
    no_study = make_dicom(pixels, bits=8)  # the factory sets no Study/Series Instance UID
    analysis = analyse(fake_pipeline, no_study)
    with pytest.raises(dicom_out.DicomOutError, match="StudyInstanceUID"):
        dicom_out.build(no_study, analysis.result, analysis.overlays)
    no_pixels = with_study(make_dicom(None))
    with pytest.raises(dicom_out.DicomOutError, match="not analysed"):
        dicom_out.build(no_pixels, analyse(fake_pipeline, no_pixels).result, [])
    private = pydicom.dcmread(io.BytesIO(with_study(make_dicom(pixels, bits=8))))
    private.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.10.999.1"  # a private transfer syntax
    buffer = io.BytesIO()
    private.save_as(buffer)
    private_bytes = buffer.getvalue()
    result = analyse(fake_pipeline, private_bytes).result
    assert result.outcome == "rejected"
    with pytest.raises(dicom_out.DicomOutError, match="not analysed"):
        dicom_out.build(private_bytes, result, [])
    with pytest.raises(ValueError, match="DICOM_UID_ROOT"):
        dicom_out.build(with_study(make_dicom(pixels, bits=8)), analysis.result, [], uid_root="1.2.x")


# ------------------------------------------------------------------ PDF report


def need_fonts(language: str) -> None:
    """The language's report font is installed (Debian's fonts-noto-core for Hindi, Persian, Arabic)."""
    from diagnosis.pdf_report import FontMissing, font_paths

    try:
        font_paths(language)
    except FontMissing as error:
        if os.environ.get("CI"):
            pytest.fail(f"{error} (.ci/run installs it)")
        pytest.skip(str(error))


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_the_chosen_fonts_have_every_glyph_of_each_language(language):
    """Every character of every catalog string of the language (and the marks the report draws) is
    in the language's font or, for a script font, in its DejaVu fallback; the script's own letters
    (Devanagari, Arabic) are in the script font itself, so HarfBuzz shapes them with it."""
    from babel.messages.pofile import read_po
    from fontTools.ttLib import TTFont

    from diagnosis.messages import LOCALES_DIR
    from diagnosis.pdf_report import SCRIPT_FONTS, dejavu_paths, font_paths

    need_fonts(language)
    with (LOCALES_DIR / language / "LC_MESSAGES" / "diagnosis.po").open("rb") as handle:
        catalog = read_po(handle, locale=language)
    text = "▲—•⚕«»№%0123456789" + "".join(str(m.string or m.id) for m in catalog if m.id)
    wanted = {c for c in text if c.isprintable() and not c.isspace()}
    for main, fallback in zip(font_paths(language), dejavu_paths(), strict=True):
        cmaps = [TTFont(str(main)).getBestCmap()]
        if language in SCRIPT_FONTS:
            cmaps.append(TTFont(str(fallback)).getBestCmap())
            low, high = SCRIPT[language]
            own = sorted(c for c in wanted if low <= c <= high and ord(c) not in cmaps[0])
            assert own == [], f"{main.name} lacks {own}"
        missing = sorted(c for c in wanted if not any(ord(c) in cmap for cmap in cmaps))
        assert missing == [], f"{main.name} lacks {missing}"


def test_a_missing_script_font_is_named_with_its_package(monkeypatch, tmp_path):
    from diagnosis import pdf_report

    monkeypatch.setattr(pdf_report, "NOTO_DIR", tmp_path)
    with pytest.raises(pdf_report.FontMissing, match="fonts-noto-core"):
        pdf_report.font_paths("hi")
    assert pdf_report.font_paths("kk") == pdf_report.dejavu_paths()  # DejaVu Sans comes with matplotlib


def first_line_span(path: Path) -> tuple[float, float, float]:
    """(left, right, page width) in points of the page's first line of text (the title)."""
    html = subprocess.run(["pdftotext", "-bbox", str(path), "-"], capture_output=True, text=True, check=True).stdout
    words = [tuple(float(v) for v in m) for m in re.findall(
        r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="[\d.]+">', html)]
    top = min(y for _x0, y, _x1 in words)
    line = [(x0, x1) for x0, y, x1 in words if y < top + 5]
    width = float(re.search(r'<page width="([\d.]+)"', html).group(1))
    return min(x0 for x0, _x1 in line), max(x1 for _x0, x1 in line), width


@pytest.mark.parametrize("page_size", ["A4", "Letter"])
def test_pdf_report_is_one_page_in_each_language_without_patient_identifiers(fake_pipeline, tmp_path, page_size):
    from diagnosis.intake import decode
    from diagnosis.pdf_report import report_pdf

    need("pdftotext", "pdfinfo", "pdftoppm")
    data = with_study(make_dicom(gradient(256, 256, texture=True), bits=8, patient_name="DOE^JANE",
                                 patient_id="PID-12345"))
    analysis = analyse(fake_pipeline, data)
    expected_points = {"A4": "595.28 x 841.89", "Letter": "612 x 792"}[page_size]
    for language in LANGUAGES:
        need_fonts(language)
        pdf = report_pdf(analysis.result, analysis.overlays, decode(data).gray, language, page_size)
        path = tmp_path / f"{language}.pdf"
        path.write_bytes(pdf)
        info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
        assert "Pages:           1" in info and expected_points in info, info
        text = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True,
                              check=True).stdout
        if language in SCRIPT:
            low, high = SCRIPT[language]
            assert sum(low <= c <= high for c in text) > 500, language  # set in its script, not boxes
        else:
            assert TITLE[language] in text and PHYSICIAN[language] in text, language
        left, right, width = first_line_span(path)  # right to left: the title starts at the right margin
        margin = 12 / 25.4 * 72
        if language in RTL:
            assert abs(right - (width - margin)) < 3 and left > margin + 20, (language, left, right)
        else:
            assert abs(left - margin) < 3, (language, left, right)
        assert "DOE" not in text and "PID-12345" not in text and "ACC-1" not in text
        assert all(version in text for version in analysis.result.models.values())
        subprocess.run(["pdftoppm", "-r", "40", "-png", "-singlefile", str(path), str(tmp_path / language)],
                       check=True)
        with Image.open(tmp_path / f"{language}.png") as page:  # rendered: a portrait page, not blank
            assert page.height > page.width and np.asarray(page.convert("L")).std() > 10


# ------------------------------------------------------------------ CLI


def test_cli_writes_sr_sc_and_pdf_where_asked(fake_models, tmp_path):
    source = tmp_path / "film.dcm"
    source.write_bytes(with_study(make_dicom(gradient(256, 256, texture=True), bits=8)))
    photo = tmp_path / "photo.png"
    Image.fromarray(gradient(texture=True)).save(photo)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "diagnosis.cli", str(source), str(photo), "--json", "--models",
                           str(fake_models), "--dicom-out", str(out), "--pdf", str(out), "--language", "ru",
                           "--uid-root", UID_ROOT, "--page-size", "Letter"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr  # the PNG cannot become DICOM objects: said, and counted
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert Path(first["dicom_files"][0]).name == "film_sr.dcm"
    assert Path(first["dicom_files"][1]).name == "film_sc_1.dcm" and first["pdf"] == str(out / "film_report.pdf")
    assert all(Path(p).is_file() for p in [*first["dicom_files"], first["pdf"]])
    assert second["dicom_files"] == [] and second["pdf"] == str(out / "photo_report.pdf")
    assert "no DICOM objects for" in proc.stderr and "not a DICOM file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert pydicom.dcmread(first["dicom_files"][0]).SOPInstanceUID.startswith(UID_ROOT)


def test_cli_refuses_a_malformed_uid_root(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diagnosis.cli", str(tmp_path / "x.dcm"), "--dicom-out",
                           str(tmp_path), "--uid-root", "1.2.abc"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2 and "DICOM_UID_ROOT" in proc.stderr


# ------------------------------------------------------------------ a real PACS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def orthanc(tmp_path):
    """Orthanc with the DICOMweb plugin on a free loopback port; storage in a temp dir."""
    need("Orthanc")
    if not DICOMWEB_PLUGIN.is_file():
        need("libOrthancDicomWeb.so (orthanc-dicomweb)")
    port = free_port()
    config = {
        "Name": "xso-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/system", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Orthanc did not start:\n" + (tmp_path / "orthanc.log").read_text()[-3000:])
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def http_json(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read() or b"null")


def stow(base: str, files: list[bytes]) -> dict:
    """DICOMweb STOW-RS: one multipart/related POST of application/dicom parts."""
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
                    for data in files) + b"--" + boundary.encode() + b"--\r\n"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return http_json(f"{base}/dicom-web/studies", "POST", body,
                     {"Content-Type": content_type, "Accept": "application/dicom+json"})


@pytest.mark.slow
def test_results_are_filed_in_the_study_of_a_real_pacs(orthanc, pack, tmp_path):
    """Source into Orthanc → analysis (shipped models) → SR + SC by STOW-RS → read back by QIDO/REST."""
    import highdicom as hd

    from diagnosis import dicom_out
    from diagnosis.pipeline import Pipeline

    need("dciodvfy")
    source_bytes = with_study(make_dicom(film(pack), bits=8))
    source = pydicom.dcmread(io.BytesIO(source_bytes))
    stored = stow(orthanc, [source_bytes])
    assert "00081190" in stored  # Retrieve URL of the stored study

    analysis = Pipeline.load().run(source_bytes, file="film.dcm", mode="clinician")
    assert analysis.result.outcome == "analysed" and analysis.overlays
    objects = dicom_out.build(source_bytes, analysis.result, analysis.overlays, uid_root=UID_ROOT)
    paths = dicom_out.write(objects, tmp_path, "film")
    for path in paths:
        errors, output = dciodvfy(path)
        assert errors == [], output
    answer = stow(orthanc, [path.read_bytes() for path in paths])
    assert len(answer.get("00081199", {}).get("Value", [])) == len(paths), json.dumps(answer)[:3000]
    assert not answer.get("00081198", {}).get("Value"), json.dumps(answer)[:3000]  # none failed

    study = source.StudyInstanceUID
    studies = http_json(f"{orthanc}/dicom-web/studies?StudyInstanceUID={study}")
    assert len(studies) == 1 and len(http_json(f"{orthanc}/studies")) == 1  # one study, the source's
    series = http_json(f"{orthanc}/dicom-web/studies/{study}/series")
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert len(series) == 3 and modalities == sorted([source.Modality, "OT", "SR"])
    sc_series = next(s for s in series if s["0020000E"]["Value"][0] == objects.captures[0].SeriesInstanceUID)
    assert sc_series["0008103E"]["Value"][0] == "AI evidence map - not for diagnosis"

    # Read the SR back from the PACS and its findings with highdicom.
    [sr_id] = http_json(f"{orthanc}/tools/lookup", "POST", objects.sr.SOPInstanceUID.encode())
    with urllib.request.urlopen(f"{orthanc}/instances/{sr_id['ID']}/file", timeout=60) as answer:
        sr = pydicom.dcmread(io.BytesIO(answer.read()))
    assert sr.StudyInstanceUID == study and sr.PatientID == source.PatientID
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    top = analysis.result.findings[0]
    group = next(g for g in groups[1:] if g.finding_type.meaning == dicom_out.FINDING_NAMES[top.label])
    assert group.get_measurements(name=dicom_out.ESTIMATE)[0].value == pytest.approx(top.probability, abs=1e-6)
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    tags = http_json(f"{orthanc}/instances/{sr_id['ID']}/simplified-tags")
    assert tags["CompletionFlag"] == "COMPLETE" and tags["VerificationFlag"] == "UNVERIFIED"
