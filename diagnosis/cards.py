"""Model cards: the one place per model for labels, input contract, thresholds, metrics and weights.

Training writes cards; inference only reads them. No torch here, so any process can read a card.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"


class CardError(Exception):
    """A model folder is missing, inconsistent or fails its integrity check."""


class InputSpec(BaseModel):
    channels: Literal[1] = 1
    size: int = Field(gt=15, le=1024)
    mean: float = 0.5  # applied to pixel/255
    std: float = 0.25
    description: str = "8-bit grayscale, squashed to size×size, (pixel/255 - mean) / std"


class WeightsSpec(BaseModel):
    file: str = WEIGHTS_FILE
    sha256: str
    dtype: str = "float32"


class Platt(BaseModel):
    """Platt scaling of one output: calibrated p = sigmoid(a · logit + b)."""

    a: float
    b: float


class Calibration(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str = "Platt scaling per output on the logit"
    fitted_on: str = ""
    params: dict[str, Platt] = Field(default_factory=dict)  # output name → parameters


class PointFigures(BaseModel):
    """What an operating point does on one split (NIH films with all 14 labels known)."""

    model_config = ConfigDict(extra="allow")

    n: int
    positives: int
    prevalence: float | None = None  # positives / n on this split: the prevalence the PPV assumes
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    auc: float | None = None


class LabelPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    eligible: bool = True  # screening: the model is good enough at this label to flag it at all
    threshold: float | None = None  # on the calibrated scale; None: never flagged
    urgent: bool = False  # its PPV at this point justifies urgent wording
    val: PointFigures | None = None
    test: PointFigures | None = None


class VerdictPoint(BaseModel):
    """The overall "worth showing a doctor soon" point on a normal-vs-abnormal score."""

    model_config = ConfigDict(extra="allow")

    # "abnormal": the card's calibrated extra output; "findings_score": sigmoid(weights · calibrated
    # logits of the labels + bias), fitted on val for cards without such an output.
    output: str
    threshold: float
    weights: list[float] | None = None
    bias: float | None = None
    val: PointFigures | None = None  # of the verdict as shown (score point or any screening flag)
    test: PointFigures | None = None


class OperatingPoints(BaseModel):
    model_config = ConfigDict(extra="allow")

    screening: dict[str, LabelPoint] = Field(default_factory=dict)
    clinician: dict[str, LabelPoint] = Field(default_factory=dict)
    verdict: VerdictPoint | None = None
    method: dict[str, Any] = Field(default_factory=dict)  # how each was chosen, in words and numbers


class AuxiliaryFile(BaseModel):
    """Arrays fitted beside the weights (safetensors, never pickle), checked by sha256 when loaded."""

    file: str
    sha256: str


class OpenSetSpec(BaseModel):
    """Body part: is the film a part the model knows at all? (diagnosis.openset)

    Mahalanobis distance of the pooled features to the nearest known part (class means and one
    shared covariance fitted on train films, Lee et al. 2018); above ``threshold`` the film is a
    body part the model cannot read (``photo_threshold`` for straightened photos of films, when set).
    ``label_min_confidence`` raises the top-1 floor for single
    parts, e.g. chest, so that only a confident chest reaches the chest model.
    """

    method: Literal["mahalanobis"] = "mahalanobis"
    arrays: AuxiliaryFile  # "means" (parts × features) and "precision" (features × features)
    normalise: bool = True  # L2-normalise the pooled features first
    threshold: float
    # Photos of films (``result.photographed``) and pictures the photo step straightened
    # (``result.rectified``) lie further from the train films than digital films: their own
    # threshold, chosen on val photos (``photo_view``). None: ``threshold``.
    photo_threshold: float | None = None
    label_min_confidence: dict[str, float] = Field(default_factory=dict)
    # The same floors for straightened photos (chosen on val photos); None: ``label_min_confidence``.
    photo_label_min_confidence: dict[str, float] | None = None
    # A film the classifier names with at least ``confident_probability`` may lie further out, up to
    # ``confident_threshold``, before it is called a part the model cannot read: a percentile
    # threshold alone refuses its share of good films, most of which the classifier is sure of
    # (chosen on val from a curve of known parts kept vs hold-out parts refused). None: no allowance.
    confident_probability: float | None = None
    confident_threshold: float | None = None
    method_notes: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)

    @staticmethod
    def photo_view(photographed: bool, rectified: bool) -> bool:
        """Is an input judged by the photo threshold and floors? A phone photo (colour, or a film
        found in it), or a picture the photo step straightened (a film turned back on its padding)."""
        return photographed or rectified

    def is_unknown(self, distance: float, confidence: float, photo: bool) -> bool:
        """The one rule (pipeline and training alike): is this film a part the model cannot read?
        ``photo``: ``photo_view`` of the input."""
        if distance <= self.threshold_for(photo):
            return False
        confident = self.confident_probability is not None and confidence >= self.confident_probability
        return not (confident and self.confident_threshold is not None and distance <= self.confident_threshold)

    def threshold_for(self, photo: bool) -> float:
        """The threshold for one input: the photo threshold for a ``photo_view`` input."""
        return self.photo_threshold if photo and self.photo_threshold is not None else self.threshold

    def floors_for(self, photo: bool) -> dict[str, float]:
        """Per-part top-1 floors for one input: the photo floors for a ``photo_view`` input."""
        floors = self.photo_label_min_confidence
        return floors if photo and floors is not None else self.label_min_confidence


class ModalitySpec(BaseModel):
    """Gate: what a non-X-ray image is (CT, MRI, ultrasound, another medical image, or not medical).

    A multinomial logistic regression on the gate network's pooled features: ``arrays`` holds
    "weight" (classes × features) and "bias" (classes). The gate's own threshold still decides
    X-ray or not; this only names what a refused image seems to be.
    """

    classes: list[Literal["xray", "ct", "mri", "ultrasound", "other_medical", "non_medical"]]
    arrays: AuxiliaryFile
    # "non_medical" (a reply without the physician footer) only at this probability or above;
    # below it the image is not named (the plain refusal, with the footer).
    non_medical_min_probability: float = 0.5
    method_notes: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class OrientationSpec(BaseModel):
    """Gate: which way up was the picture sent? (diagnosis.openset.OrientationHead)

    A multinomial logistic regression on the gate network's whole post-ReLU map (flattened,
    L2-normalised; pooling would forget where the neck or the fingers are). ``classes`` are the turns,
    counter-clockwise in degrees, that bring an upright film to the picture as sent, plus "not_xray";
    ``arrays`` holds "weight" (classes × features) and "bias". A picture is turned back upright only
    when a turn other than 0 reaches ``min_probability`` — or ``min_probability_refused`` when the
    gate refuses the picture as sent (an upright X-ray almost never is, so turning it risks little).
    A turn that reaches only ``confirm_min_probability`` is undone on trial: it is kept when the
    head, shown the turned-back picture (the gate's second pass), calls it upright ("0") with at
    least ``confirm_upright_probability``; else the picture is read as sent. With
    ``not_xray_min_probability`` set, a picture the gate accepts is still refused as not an X-ray
    when the head gives the picture the gate finally saw "not_xray" at least that probability (the
    gate was trained on upright pictures only; the head saw non-X-rays at every turn). With
    ``search_upright_below`` set, a picture left as sent (no turn, or a turn on trial that failed)
    that the head calls upright ("0") with less than that probability is searched: its three
    turned-back copies go through the gate in one pass, and the copy the head calls upright most
    confidently is read when that reaches ``search_upright_probability``; else the picture as sent.
    With ``search_consensus_probability`` set, the four views (as sent and the three copies) vote
    instead, "not an X-ray" among the hypotheses, and pictures the head's "not_xray" refuses as sent
    are searched too (``OrientationHead.best_turn``).
    """

    classes: list[Literal["0", "90", "180", "270", "not_xray"]]
    arrays: AuxiliaryFile
    min_probability: float = 0.5
    min_probability_refused: float | None = None  # None: ``min_probability`` for every picture
    confirm_min_probability: float | None = None  # None: no turn on trial
    confirm_upright_probability: float = 0.5
    not_xray_min_probability: float | None = None  # None: the gate alone says X-ray or not
    search_upright_below: float | None = None  # None: no search
    search_upright_probability: float = 0.5
    search_consensus_probability: float | None = None  # None: the copy read most upright, refused not searched
    method_notes: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


HEATMAP_METHODS = ("evidence_minus_normal_mean", "block3_gradient_x_activation_minus_normal_mean")


class HeatmapSpec(BaseModel):
    """Abnormality model: what the overlays show (diagnosis.heatmap.relative_evidence).

    ``method`` names the per-film signed map ``M_c`` (``diagnosis.heatmap.NormalBaseline``):

    * "evidence_minus_normal_mean": ``M_c = W_c · A`` on the final post-ReLU map (4 × 4 at 128 px);
    * "block3_gradient_x_activation_minus_normal_mean": gradient × activation of the logit at the
      block-3 map (``features.transition3.relu``, 8 × 8 at 128 px): ``Σ_k B_k · ∂z_c/∂B_k``.

    ``arrays`` holds "mean" (labels × h × w): the mean of ``M_c`` over normal val films (all labels
    0), and "scale" (labels): the excess over that mean, in the same units, that is drawn at full
    colour. A film's map is ``(M_c − mean_c) / scale_c`` clipped to [-1, 1]: red where this film raised
    the finding's estimate more than a typical normal film does, blue where less. It may also hold
    "final_mean"/"final_scale", the same for the 4 × 4 map, kept for measuring the two side by side
    (``python -m training measure-heatmaps``). Fitted by ``python -m training heatmap-baseline``.
    """

    method: Literal[HEATMAP_METHODS] = "evidence_minus_normal_mean"
    layer: str = "relu (post-ReLU output of features.norm5)"
    arrays: AuxiliaryFile
    method_notes: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    """Card schema (MONAI network_data_format + torchxrayvision labels/op-thresholds, combined)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    role: Literal["gate", "body_part", "abnormality"]
    body_part: str | None = None  # abnormality models: which body part they analyse
    architecture: Literal["densenet121"] = "densenet121"
    labels: list[str]
    # Network outputs after the labels that are not findings, e.g. "abnormal" (any finding) of a
    # chest model; the network has len(labels) + len(extra_outputs) outputs.
    extra_outputs: list[str] = Field(default_factory=list)
    activation: Literal["sigmoid", "softmax"]
    input: InputSpec
    # gate: threshold on the "xray" probability; body_part: minimum top-1 probability;
    # abnormality: per-label operating points.
    thresholds: dict[str, float] = Field(default_factory=dict)
    threshold_method: str = "default 0.5"
    positive_label: str | None = None  # gate: the label that means "is an X-ray"
    min_confidence: float | None = None  # body_part: below this we ask for a clearer image
    heatmap_layer: str = "relu (post-ReLU output of features.norm5)"
    flip_average: bool = False  # test-time augmentation: logits averaged with the mirror image's
    open_set: OpenSetSpec | None = None  # body_part: recognise parts it was not trained on
    modality: ModalitySpec | None = None  # gate: name CT / MRI / ultrasound when refusing an image
    orientation: OrientationSpec | None = None  # gate: turn a film sent sideways or upside down upright
    # abnormality: overlays relative to normal films; None: the older signed map scaled per film
    heatmap: HeatmapSpec | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    # Written by ``python -m training calibrate``; absent on older cards (diagnosis.operating then
    # flags nothing in screening mode and says it is unsure).
    calibration: Calibration | None = None
    operating_points: OperatingPoints | None = None
    ece: dict[str, Any] = Field(default_factory=dict)
    data_sources: list[dict[str, Any]] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsSpec

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(set(self.labels)) != len(self.labels) or not self.labels:
            raise ValueError("labels must be unique and non-empty")
        if self.role == "gate" and self.positive_label not in self.labels:
            raise ValueError("a gate card needs positive_label among its labels")
        if self.role == "abnormality" and not self.body_part:
            raise ValueError("an abnormality card needs body_part")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError("extra_outputs must be unique and differ from the labels")
        if self.extra_outputs and self.activation != "sigmoid":
            raise ValueError("extra_outputs need independent (sigmoid) outputs")
        if self.activation == "softmax" and len(self.labels) < 2:
            raise ValueError("softmax needs at least two labels")
        if self.open_set and (self.role != "body_part" or set(self.open_set.label_min_confidence)
                              .union(self.open_set.photo_label_min_confidence or {}) - set(self.labels)):
            raise ValueError("open_set belongs on a body_part card and names only its labels")
        if self.modality and (self.role != "gate" or len(set(self.modality.classes)) != len(self.modality.classes)):
            raise ValueError("modality belongs on a gate card, with unique classes")
        if self.orientation and (self.role != "gate" or "0" not in self.orientation.classes):
            raise ValueError("orientation belongs on a gate card, with the class '0'")
        if self.heatmap and self.role != "abnormality":
            raise ValueError("heatmap belongs on an abnormality card")
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds for unknown labels: {sorted(unknown)}")
        if self.calibration and set(self.calibration.params) - set(self.outputs):
            raise ValueError("calibration for unknown outputs")
        points = self.operating_points
        if points and (set(points.screening) | set(points.clinician)) - set(self.labels):
            raise ValueError("operating points for unknown labels")
        if points and points.verdict:
            verdict = points.verdict
            if verdict.output == "abnormal" and "abnormal" not in self.extra_outputs:
                raise ValueError("verdict on an 'abnormal' output the card does not have")
            if verdict.output == "findings_score" and len(verdict.weights or []) != len(self.labels):
                raise ValueError("a findings_score verdict needs one weight per label")
        return self

    @property
    def outputs(self) -> list[str]:
        """Names of the network's outputs, in order: the labels, then the extra outputs."""
        return self.labels + self.extra_outputs

    def threshold(self, label: str) -> float:
        return float(self.thresholds.get(label, 0.5))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(folder: Path | str, verify: bool = True) -> ModelCard:
    """Read and validate ``folder/card.json``; with ``verify`` also check the weights' sha256."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise CardError(f"no {CARD_FILE} in model folder {folder.name!r}")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text(encoding="utf-8")))
    except (ValueError, json.JSONDecodeError) as error:
        raise CardError(f"invalid card in {folder.name!r}: {error}") from None
    if verify:
        weights = folder / card.weights.file
        if not weights.is_file():
            raise CardError(f"weights file {card.weights.file!r} missing in {folder.name!r}")
        actual = sha256_of(weights)
        if actual != card.weights.sha256:
            raise CardError(
                f"sha256 mismatch for {folder.name!r}: card says {card.weights.sha256[:12]}…, "
                f"file is {actual[:12]}…; refusing to load"
            )
    return card


def write_card(folder: Path | str, card: ModelCard) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
    return path


def discover(models_dir: Path | str) -> dict[str, tuple[Path, ModelCard]]:
    """All model folders under ``models_dir`` (cards only, hashes not yet checked), by folder name."""
    found: dict[str, tuple[Path, ModelCard]] = {}
    root = Path(models_dir)
    if not root.is_dir():
        raise CardError(f"models folder {str(root)!r} does not exist")
    for folder in sorted(p for p in root.iterdir() if (p / CARD_FILE).is_file()):
        found[folder.name] = (folder, read_card(folder, verify=False))
    return found


def analysable_parts(models_dir: Path | str, chosen: dict[str, str] | None = None) -> list[str]:
    """The body parts the service analyses, as the pipeline picks its abnormality models: the parts chosen
    by name (``ABNORMALITY_MODELS``) and the part of every abnormality card under ``models_dir``. Only the
    cards' JSON is read (no weights, no torch): the bot names the parts in /start from here."""
    parts = set(chosen or {})
    try:
        found = discover(models_dir)
    except CardError:  # no models folder here (a bot without the models volume): the chosen parts only
        return sorted(parts)
    return sorted(parts | {card.body_part for _folder, card in found.values()
                           if card.role == "abnormality" and card.body_part})
