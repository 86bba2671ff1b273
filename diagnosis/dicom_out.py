"""DICOM out for DICOM in: a TID 1500 measurement report (Comprehensive 3D SR) and one Secondary
Capture per drawn evidence map, filed in the source image's study (highdicom on pydicom).

For an *analysed* DICOM image (``DiagnosisResult.outcome == "analysed"``):

- **SR** (Comprehensive 3D SR, TID 1500 "Imaging Measurement Report"), in a new series: one
  measurement group (TID 1501) for the verdict (abnormal score, the verdict's operating point with
  its sensitivity/specificity/PPV, the verdict as a coded qualitative evaluation) and one per
  finding (calibrated estimate, the chosen mode's operating point, its sensitivity, specificity, PPV
  and AUC on the validation films, flagged yes/no in that mode). Each group names the abnormality
  model as algorithm identification (name, version; the card sha256 of every model of the run as
  parameters) and references the source image. Completion COMPLETE, verification UNVERIFIED: no
  person has read it.
- **SC** (Secondary Capture Image Storage, RGB) per overlay, in one new series of the same study,
  series description ``SERIES_DESCRIPTION``; each refers to the source image (Source Image Sequence).

Patient and study modules are copied from the source, so a PACS files both series with the study;
every new UID (series, instances, the device observer) is made under the ``DICOM_UID_ROOT``
setting, or as a ``2.25.`` UUID-derived UID when it is unset. Findings use a private coding scheme
(``99XSO``, declared in the Coding Scheme Identification Sequence): the ChestX-ray14 labels have no
exact SNOMED CT equivalents that we could assert without a terminologist.

What is refused (``DicomOutError``, with a message safe to print): a result that was not analysed
(no pixels, a transfer syntax we cannot decode, not an X-ray, …: there is nothing to report), and a
source without Study/Series/SOP Instance UID or SOP Class UID (the objects could not be filed with
it, and an SR must reference its evidence). A multi-frame source was analysed on its first frame:
the SR says so by referencing frame 1. A colour, MONOCHROME1 or 16-bit source needs nothing special:
the objects carry no copy of its pixels, the SCs are 8-bit RGB renderings of the evidence maps.

Nothing here touches the network or a Telegram chat: the objects carry patient data (PHI).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from contract.settings import check_uid_root

from .report import DiagnosisResult, Finding

__all__ = ["DicomObjects", "DicomOutError", "build", "check_uid_root", "write"]

SERVICE = "xray-second-opinion"
MANUFACTURER = "xray-second-opinion (open source)"
# ASCII on purpose: PACS indexes often keep Latin-1 (Orthanc's default drops an em dash in QIDO).
SERIES_DESCRIPTION = "AI evidence map - not for diagnosis"
SR_SERIES_DESCRIPTION = "AI second opinion (SR) - not a diagnosis"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902

SCHEME = "99XSO"  # private coding scheme of this service ("99" prefix: local, DICOM PS3.16 8.2)
SCHEME_NAME = "xray-second-opinion local codes"
UNIT_ONE = CodedConcept("1", "UCUM", "no units")  # probabilities and rates in [0, 1]

PROCEDURES = {"chest": CodedConcept("399208008", "SCT", "Plain chest X-ray")}


def local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCHEME, meaning)


ESTIMATE = local("CALPROB", "Calibrated probability (model estimate)")
POINT = local("OPPOINT", "Operating point (probability threshold)")
SENSITIVITY = local("SENS", "Sensitivity at the operating point (validation)")
SPECIFICITY = local("SPEC", "Specificity at the operating point (validation)")
PPV = local("PPV", "Positive predictive value at the operating point (validation)")
AUC = local("AUC", "Area under the ROC curve (validation)")
ABNORMAL = local("ABNORMAL", "Any finding (abnormal score)")
VERDICT = local("VERDICT", "Verdict of the automated second opinion")
VERDICTS = {
    "no_strong_sign": local("NOSTRONG", "No strong sign of the findings the model checks reliably"),
    "see_doctor": local("SEEDOC", "Signs worth showing a doctor soon"),
    "urgent": local("URGENT", "Urgent signs: see a doctor today"),
    "unsure": local("UNSURE", "Unsure: no validated operating point"),
}
FINDING_NAMES = {  # the card's label → plain English meaning of its code
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural effusion",
    "Infiltration": "Infiltration", "Mass": "Mass", "Nodule": "Nodule", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Pulmonary oedema",
    "Emphysema": "Emphysema", "Fibrosis": "Fibrosis", "Pleural_Thickening": "Pleural thickening",
    "Hernia": "Hiatal hernia",
}  # fmt: skip


class DicomOutError(ValueError):
    """DICOM objects cannot be made for this input; the message is safe to show (no patient data)."""


@dataclass
class DicomObjects:
    sr: Dataset
    captures: list[Dataset] = field(default_factory=list)  # one Secondary Capture per overlay, drawn order

    def all(self) -> list[Dataset]:
        return [self.sr, *self.captures]


def new_uid(root: str | None) -> str:
    """A fresh, unique UID: random under ``root`` (pydicom hashes 64 random bits in), else ``2.25.<uuid4>``."""
    return generate_uid(prefix=check_uid_root(root) or None)


TYPE2_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                       "StudyDate", "StudyTime", "ReferringPhysicianName")


def read_source(data: bytes) -> Dataset:
    """The source's header (pixels not read); ``DicomOutError`` when it is not a DICOM file we can file to."""
    try:
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        raise DicomOutError("the input is not a readable DICOM file") from None
    missing = [name for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
               if not str(getattr(source, name, "") or "").strip()]
    if missing:
        raise DicomOutError(f"the DICOM file has no {', '.join(missing)}: results cannot be filed in its study")
    for keyword in TYPE2_PATIENT_STUDY:  # Type 2: present, empty when the source does not know them
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def service_version() -> str:
    try:
        return version(SERVICE)
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def build(source_bytes: bytes, result: DiagnosisResult, overlays: list[tuple[str, bytes]],
          uid_root: str | None = None, now: datetime | None = None) -> DicomObjects:
    """The SR and one SC per overlay for an analysed DICOM image; ``DicomOutError`` otherwise."""
    if result.outcome != "analysed" or not result.findings:
        raise DicomOutError(f"nothing to report: the image was not analysed (outcome {result.outcome})")
    source = read_source(source_bytes)
    root = check_uid_root(uid_root)
    now = now or datetime.now(UTC)
    captures = [secondary_capture(source, jpeg, label, result, number, root, now, series_uid)
                for series_uid in [new_uid(root)]
                for number, (label, jpeg) in enumerate(overlays, start=1)]
    return DicomObjects(sr=measurement_report(source, result, root, now), captures=captures)


def _algorithm(result: DiagnosisResult) -> AlgorithmIdentification:
    """The abnormality model (the one whose estimates these are) by name and version; every model of
    the run, with its card's sha256, as parameters."""
    part = result.body_part or ""
    name = next((n for n in result.models if part and part in n), None) or next(iter(result.models), SERVICE)
    parameters = [f"{model} {ver} card-sha256 {result.model_cards.get(model, 'unknown')}"
                  for model, ver in result.models.items()]
    parameters.append(f"mode {result.mode}")
    return AlgorithmIdentification(name=f"{SERVICE} {name}", version=result.models.get(name, "unknown"),
                                   parameters=parameters)


def _figures(values: list[tuple[CodedConcept, float | None]], algorithm: AlgorithmIdentification) -> list[Measurement]:
    return [Measurement(name=name, value=float(value), unit=UNIT_ONE, algorithm_id=algorithm)
            for name, value in values if value is not None and np.isfinite(value)]


def _yes_no(flag: bool) -> CodedConcept:
    code = codes.SCT.Yes if flag else codes.SCT.No
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def measurement_report(source: Dataset, result: DiagnosisResult, root: str | None, now: datetime) -> Comprehensive3DSR:
    algorithm = _algorithm(result)
    frame = [1] if int(getattr(source, "NumberOfFrames", 1) or 1) > 1 else None
    try:
        source_ref = [SourceImageForMeasurementGroup.from_source_image(source, referenced_frame_numbers=frame)]
    except TypeError:  # frames in a single-frame SOP class (a malformed source): the whole instance
        source_ref = [SourceImageForMeasurementGroup.from_source_image(source)]
    point = result.verdict_point or {}
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=new_uid(root), identifier="Verdict"),
        finding_type=ABNORMAL,
        algorithm_id=algorithm,
        measurements=_figures([(ESTIMATE, result.abnormal_probability), (POINT, point.get("threshold")),
                               (SENSITIVITY, point.get("sensitivity")), (SPECIFICITY, point.get("specificity")),
                               (PPV, point.get("ppv"))], algorithm) or None,
        qualitative_evaluations=[QualitativeEvaluation(VERDICT, VERDICTS[result.verdict or "unsure"])],
        source_images=source_ref,
    )]
    flag_name = local("FLAGGED", f"Flagged at the operating point of {result.mode} mode")
    for finding in result.findings:
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=new_uid(root), identifier=finding.label),
            finding_type=finding_code(finding),
            algorithm_id=algorithm,
            measurements=_figures([(ESTIMATE, finding.probability), (POINT, finding.threshold),
                                   (SENSITIVITY, finding.sensitivity), (SPECIFICITY, finding.specificity),
                                   (PPV, finding.ppv), (AUC, finding.auc)], algorithm),
            qualitative_evaluations=[QualitativeEvaluation(flag_name, _yes_no(finding.positive))],
            source_images=source_ref,
        ))
    device = DeviceObserverIdentifyingAttributes(  # the same UID for every report under one root
        uid=generate_uid(prefix=root or None, entropy_srcs=[SERVICE, "device observer"]),
        name=SERVICE, manufacturer_name=MANUFACTURER, model_name=f"{SERVICE} {service_version()}",
    )
    context = ObservationContext(observer_device_context=ObserverContext(observer_type=codes.DCM.Device,
                                                                         observer_identifying_attributes=device))
    procedure = PROCEDURES.get(result.body_part or "", local("XR", "X-ray radiography"))
    report = MeasurementReport(observation_context=context, procedure_reported=procedure, imaging_measurements=groups)
    sr = Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=new_uid(root), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=new_uid(root), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        content_date=now.strftime("%Y%m%d"), content_time=now.strftime("%H%M%S"),
    )
    _finish(sr, source, now)
    return sr


def finding_code(finding: Finding) -> CodedConcept:
    meaning = FINDING_NAMES.get(finding.label, finding.label.replace("_", " "))
    value = re.sub(r"[^A-Za-z0-9]", "", finding.label).upper()[:16] or "FINDING"
    return local(value, meaning)


def secondary_capture(source: Dataset, jpeg: bytes, label: str, result: DiagnosisResult, number: int,
                      root: str | None, now: datetime, series_uid: str) -> Dataset:
    """One evidence map (the overlay JPEG, decoded to 8-bit RGB) as a Secondary Capture of the study."""
    with Image.open(io.BytesIO(jpeg)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    probability = next((f.probability for f in result.findings if f.label == label), None)
    estimate = "" if probability is None else f" (model estimate {probability:.0%})"
    meaning = FINDING_NAMES.get(label, label)
    sc = hd.sc.SCImage(
        pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=source.StudyInstanceUID, series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER, sop_instance_uid=new_uid(root), instance_number=number,
        manufacturer=MANUFACTURER, **_patient_study(source), transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        patient_orientation=("L", "F"),  # replaced below: highdicom wants one, the source decides
    )
    # The map keeps the source's orientation (resized, never turned): its Patient Orientation, else
    # empty (Type 2: unknown), rather than a guess.
    orientation = list(getattr(source, "PatientOrientation", None) or [])
    sc.PatientOrientation = orientation if len(orientation) == 2 else ""
    sc.Laterality = getattr(source, "Laterality", "") or ""  # Type 2C: the source's, else unknown
    if getattr(source, "BodyPartExamined", None):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"  # colours and a legend bar only, no words in the pixels
    sc.DerivationDescription = (f"Class evidence map for {meaning}{estimate}: red raised, blue lowered the "
                                "estimate. Not for diagnosis.")[:1024]
    sc.ImageComments = f"{SERVICE} {service_version()}; {label}; mode {result.mode}. Not for diagnosis."
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.ContentDate, sc.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    _finish(sc, source, now)
    return sc


def _patient_study(source: Dataset) -> dict:
    names = {"PatientID": "patient_id", "PatientName": "patient_name", "PatientBirthDate": "patient_birth_date",
             "PatientSex": "patient_sex", "AccessionNumber": "accession_number", "StudyID": "study_id",
             "StudyDate": "study_date", "StudyTime": "study_time",
             "ReferringPhysicianName": "referring_physician_name"}
    values = {}
    for keyword, argument in names.items():
        value = getattr(source, keyword, None)
        if value not in (None, ""):
            values[argument] = value
    if values.get("patient_sex") not in (None, "M", "F", "O"):
        values.pop("patient_sex")
    return values


def _finish(dataset: Dataset, source: Dataset, now: datetime) -> None:
    """Character set, creation time, the private coding scheme's declaration."""
    if "SpecificCharacterSet" in source:  # our own strings are ASCII; copied names keep the source's
        dataset.SpecificCharacterSet = source.SpecificCharacterSet
    elif "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dataset.SoftwareVersions = f"{SERVICE} {service_version()}"
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    dataset.CodingSchemeIdentificationSequence = [scheme]


def write(objects: DicomObjects, directory: Path, stem: str) -> list[Path]:
    """``<stem>_sr.dcm`` and ``<stem>_sc_<n>.dcm`` (n in drawn order) in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}_sr.dcm", *(directory / f"{stem}_sc_{n}.dcm"
                                               for n in range(1, len(objects.captures) + 1))]
    for dataset, path in zip(objects.all(), paths, strict=True):
        dataset.save_as(path, enforce_file_format=True)
    return paths
