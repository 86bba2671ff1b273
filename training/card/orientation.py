"""Orientation head on the gate: turn a film sent sideways or upside down upright before reading it.

    python -m training orientation --model models/gate --manifest ../shared/data/xray-pack/manifest.csv \\
        [--cache DIR] [--json OUT] [--dry-run] [--mirror] [--manifest SYNTHETIC/manifest.csv --synthetic]

The labels are free: every radiograph of the pack (each known part, the unknown parts, real phone
photos of films) is turned by 0, 90, 180 and 270 degrees, and non-X-rays at every turn form a fifth
class "not_xray". Each picture is seen as the service sees it (decode, photo step:
``training.features``) and the gate's whole post-ReLU map (1024 × 4 × 4 at 128 px, flattened and
L2-normalised; its pooled features cannot tell a film turned by 90 from one turned by 270 well:
0.92 vs 0.96 on val) is fitted by a multinomial logistic regression on train; C is chosen by accuracy
on val radiographs (``--c-grid``), and the smallest ``min_probability`` that turns at most
``--max-upright-turned`` of the upright val radiographs away from upright; for pictures the gate
refuses as sent (an upright X-ray rarely is) a lower ``min_probability_refused``: the one that leaves
the most val radiographs upright and accepted while the gate accepts no more val non-X-rays than it
did before any turn (at most ``--max-extra-accepted`` more, all four turns together). Reported on
val and test: the head's accuracy per part and turn, and what the gate then decides on the picture it
sees (turned back or not), for radiographs and for non-X-rays, beside the gate alone on the picture
as sent.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

from diagnosis.cards import AuxiliaryFile, OrientationSpec, read_card, write_card
from diagnosis.openset import consensus_turn, decide_turn, load_arrays

from ..data.datasets import Record
from ..features import FeatureStore, drop_refused, service_view
from ..measure.reports import emit_report
from . import write_arrays

log = logging.getLogger(__name__)
ARRAYS_FILE = "orientation.safetensors"
TURNS = (0, 90, 180, 270)
CLASSES = ["0", "90", "180", "270", "not_xray"]
CAPS = {"train": {"chest": 700, "not_xray": 600}, "val": {"chest": 400, "not_xray": 300},
        "test": {"chest": 400, "not_xray": 300}}  # every film of the other parts


def choose_records(records: list[Record], synthetic: bool = False) -> list[Record]:
    """Per split, every radiograph of the smaller parts and a fixed sample of chest films and non-X-rays;
    ``synthetic``: every synthetic train photo too (``synthetic-photos``; val and test stay real)."""
    chosen, counts = [], defaultdict(int)
    for record in sorted(records, key=lambda r: hashlib.sha256(str(r.path.name).encode()).hexdigest()):
        if record.synthetic and synthetic and record.split == "train":
            chosen.append(record)
            continue
        if record.synthetic or record.split not in CAPS:
            continue
        group = (record.body_part or "unknown") if record.is_xray else "not_xray"
        counts[record.split, group] += 1
        if counts[record.split, group] <= CAPS[record.split].get(group, 10**9):
            chosen.append(record)
    return chosen


def turned_view(key: str) -> np.ndarray | None:
    """``<path>#<degrees>`` → the service's view of the file, turned counter-clockwise by that much;
    ``<path>#m<degrees>``: its mirror image (left and right swapped) first, then turned."""
    path, degrees = key.rsplit("#", 1)
    gray = service_view(Path(path))
    if gray is None:
        return None
    if degrees.startswith("m"):
        gray, degrees = gray[:, ::-1], degrees[1:]
    return np.ascontiguousarray(np.rot90(gray, int(degrees) // 90))


def flatten(maps: np.ndarray) -> np.ndarray:
    flat = maps.astype(np.float32)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def run(model: Path, records: list[Record], cache: Path, write: bool = True,
        max_upright_turned: float = 0.005, c_grid: tuple[float, ...] = (10.0, 30.0, 100.0),
        max_extra_accepted: float = 0.005, confirm: bool = True, max_films_refused: float | None = 0.002,
        search_grid: tuple[tuple[float, float, float | None], ...] = (), keep_head: bool = False, mirror: bool = False,
        synthetic: bool = False) -> dict:
    card = read_card(model)
    chosen = choose_records(records, synthetic)
    store = FeatureStore(model, cache, spatial=True)
    keys = [f"{r.path}#{turn}" for r in chosen for turn in TURNS]
    logits, maps = store.outputs(keys, views=turned_view)
    per_file = (len(chosen), len(TURNS), -1)  # a refused file is refused at every turn
    chosen, (logits, maps), refused = drop_refused(chosen, logits.reshape(per_file), maps.reshape(per_file))
    mirrored = [r for r in chosen if r.split == "train"] if mirror and not keep_head else []
    if mirrored:  # a left shoulder is a right one's mirror image: twice the train pictures, for the fit only
        keys = [f"{r.path}#m{turn}" for r in mirrored for turn in TURNS]
        extra_logits, extra_maps = store.outputs(keys, views=turned_view)
        per_file = (len(mirrored), len(TURNS), -1)
        mirrored, (extra_logits, extra_maps), _ = drop_refused(
            mirrored, extra_logits.reshape(per_file), extra_maps.reshape(per_file))
    logits, maps = logits.reshape(-1, logits.shape[-1]), maps.reshape(-1, maps.shape[-1])
    n = len(chosen)
    xray = np.array([r.is_xray for r in chosen])
    group = np.array([(r.body_part or "unknown") if r.is_xray else "not_xray" for r in chosen])
    photo = np.array([r.phone_photo for r in chosen])
    kind = np.array([r.kind for r in chosen])
    split = np.array([r.split for r in chosen])
    turn_index = np.tile(np.arange(len(TURNS)), n)
    y = np.where(np.repeat(xray, len(TURNS)), turn_index, CLASSES.index("not_xray"))
    row_split = np.repeat(split, len(TURNS))
    train, val = row_split == "train", row_split == "val"
    x = flatten(maps)

    shipped = card.orientation if keep_head else None
    if keep_head and shipped is None:
        raise SystemExit(f"--keep-head: {model} has no orientation head to keep")
    fit_x, fit_y = x[train], y[train]
    if mirrored:
        fit_x = np.concatenate([fit_x, flatten(extra_maps.reshape(-1, extra_maps.shape[-1]))])
        mirrored_xray = np.repeat([r.is_xray for r in mirrored], len(TURNS))
        fit_y = np.concatenate([fit_y, np.where(mirrored_xray, np.tile(np.arange(len(TURNS)), len(mirrored)),
                                                CLASSES.index("not_xray"))])
    searched = {}
    for c in c_grid if shipped is None else ():
        fitted = LogisticRegression(C=c, max_iter=3000).fit(fit_x, fit_y)
        on_films = val & (y < len(TURNS))
        searched[c] = (float(np.mean(fitted.predict(x[on_films]) == y[on_films])), fitted)
        log.info("C=%g val accuracy on radiographs %.4f", c, searched[c][0])
    if shipped is None:
        best_c = max(searched, key=lambda c: searched[c][0])
        head = searched[best_c][1]
        weight, bias = head.coef_.astype(np.float32), head.intercept_.astype(np.float32)
    else:  # the card's head as shipped
        arrays = load_arrays(model, shipped.arrays)
        weight, bias = arrays["weight"].astype(np.float32), arrays["bias"].astype(np.float32)
    probs = softmax(x @ weight.T.astype(np.float64) + bias, axis=1)  # as shipped (float32 arrays)

    upright_val = val & (y == 0)
    floor = 0.95
    for candidate in np.round(np.arange(0.40, 0.96, 0.05), 2):
        turned = [decide_turn(p, CLASSES, candidate) for p in probs[upright_val]]
        if np.mean(np.asarray(turned) != 0) <= max_upright_turned:
            floor = float(candidate)
            break
    gate = softmax(logits[:, : len(card.labels)].astype(np.float64), axis=1)
    gate = gate[:, card.labels.index(card.positive_label)].reshape(n, len(TURNS))
    threshold = card.threshold(card.positive_label)
    accepted_before = gate >= threshold
    per_picture = probs.reshape(n, len(TURNS), len(CLASSES))
    # Per picture and turn sent, the head's view of it turned back by 0, 90, 180 and 270°.
    turned_back = per_picture[:, (np.arange(len(TURNS))[:, None] - np.arange(len(TURNS))[None, :]) % len(TURNS)]
    voted = {}

    def consensus(floor: float) -> np.ndarray:
        if floor not in voted:
            views = turned_back.reshape(-1, len(TURNS), len(CLASSES))
            voted[floor] = np.array(consensus_turn(views, CLASSES, floor)).reshape(n, len(TURNS))
        return voted[floor]

    def decide(refused_floor: float, trial: tuple[float, float] | None = None,
               not_xray_floor: float | None = None,
               search: tuple[float, float, float | None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The turns undone, the view the gate finally sees (the picture as sent, turned by t, turned
        back by the head's answer) and whether it accepts that view. ``trial``: (floor, upright
        probability) of a turn on trial, kept only when the head calls the turned-back view upright;
        ``not_xray_floor``: the head's "not_xray" on the final view that refuses it; ``search``:
        (below, floor, consensus) a picture left as sent (no turn, or a turn on trial that failed), called
        upright with less than ``below``, is turned back by the turn whose turned-back view the head calls
        upright most confidently (``consensus`` None) or that the four views vote for with a posterior
        of at least ``consensus``, when its view reads upright with at least ``floor`` (as shipped:
        ``OrientationHead.best_turn``)."""
        floors = np.where(accepted_before, floor, refused_floor)
        turns = np.zeros((n, len(TURNS)), int)
        for i in range(n):
            for t in range(len(TURNS)):
                turn = decide_turn(per_picture[i, t], CLASSES, floors[i, t])
                if not turn and trial is not None:
                    turn = decide_turn(per_picture[i, t], CLASSES, trial[0])
                    if turn and per_picture[i, (t - turn // 90) % len(TURNS), 0] < trial[1]:
                        turn = 0  # tried, not upright turned back: searched like any unsure picture
                if (not turn and search is not None and per_picture[i, t, 0] < search[0]
                        and (search[2] is not None or not_xray_floor is None
                             or per_picture[i, t, CLASSES.index("not_xray")] < not_xray_floor)):
                    upright = turned_back[i, t, 1:, 0]
                    best = int(np.argmax(upright)) + 1 if search[2] is None else int(consensus(search[2])[i, t])
                    turn = 90 * best if best and upright[best - 1] >= search[1] else 0
                turns[i, t] = turn
        views = (np.arange(len(TURNS))[None, :] - turns // 90) % len(TURNS)
        accepted = np.take_along_axis(gate, views, axis=1) >= threshold
        if not_xray_floor is not None:
            not_xray = np.take_along_axis(per_picture[:, :, CLASSES.index("not_xray")], views, axis=1)
            accepted &= not_xray < not_xray_floor
        return turns, views, accepted

    in_val = split == "val"
    allowed = accepted_before[in_val & ~xray].mean() + max_extra_accepted
    refused_floor, best = floor, -1.0
    for candidate in np.round(np.arange(0.40, floor + 0.001, 0.05), 2):
        _, views, accepted = decide(float(candidate))
        kept = float((accepted & (views == 0))[in_val & xray].mean())
        if accepted[in_val & ~xray].mean() <= allowed and kept > best:
            refused_floor, best = float(candidate), kept
    # Turns on trial: the most val radiographs upright and accepted, with no more upright val
    # radiographs turned and no more val non-X-rays accepted than the rules above allow.
    trial = None
    if confirm:
        for low in np.round(np.arange(floor - 0.05, 0.399, -0.05), 2):
            for upright in (0.85, 0.7, 0.5):
                turns, views, accepted = decide(refused_floor, (float(low), upright))
                kept = float((accepted & (views == 0))[in_val & xray].mean())
                if (np.mean(turns[in_val & xray, 0] != 0) <= max_upright_turned
                        and accepted[in_val & ~xray].mean() <= allowed and kept > best + 1e-9):
                    trial, best = (float(low), upright), kept
    # The head's "not_xray" refuses what the gate accepts: the lowest floor that costs at most
    # ``max_films_refused`` of the val radiographs upright and accepted, at every turn.
    not_xray_floor = None
    if max_films_refused is not None:
        _, views, accepted = decide(refused_floor, trial)
        kept = (accepted & (views == 0))[in_val & xray].mean(axis=0)
        for candidate in np.round(np.arange(0.95, 0.299, -0.05), 2):
            _, views, accepted = decide(refused_floor, trial, float(candidate))
            if np.all((accepted & (views == 0))[in_val & xray].mean(axis=0) >= kept - max_films_refused):
                not_xray_floor = float(candidate)
            else:
                break
    if shipped is not None:  # --keep-head: the card's floors too; only the search is chosen
        floor, not_xray_floor = shipped.min_probability, shipped.not_xray_min_probability
        refused_floor = floor if shipped.min_probability_refused is None else shipped.min_probability_refused
        trial = (None if shipped.confirm_min_probability is None
                 else (shipped.confirm_min_probability, shipped.confirm_upright_probability))
    # The search among the other turns for pictures the head is unsure of: the most val radiographs
    # upright and accepted, with no more upright val radiographs turned than the rules above allow
    # and no more val non-X-rays accepted at any turn than without it.
    search, search_curve = None, {}
    if search_grid:
        turns, views, accepted = decide(refused_floor, trial, not_xray_floor)
        best = float((accepted & (views == 0))[in_val & xray].mean())
        allowed_per_turn = accepted[in_val & ~xray].mean(axis=0)
        for below, upright, vote in search_grid:
            if upright < below and vote is None:
                continue  # the copy read must look more upright than the picture as sent
            turns, views, accepted = decide(refused_floor, trial, not_xray_floor, (below, upright, vote))
            kept = float((accepted & (views == 0))[in_val & xray].mean())
            turned_upright = float(np.mean(turns[in_val & xray, 0] != 0))
            not_xray_accepted = accepted[in_val & ~xray].mean(axis=0)
            search_curve[f"{below},{upright}" + (f",{vote}" if vote is not None else "")] = {
                "radiographs_upright_and_accepted": [round(float(v), 4) for v in
                                                     (accepted & (views == 0))[in_val & xray & ~photo].mean(axis=0)],
                "real_photos_upright_and_accepted": [round(float(v), 4) for v in
                                                     (accepted & (views == 0))[in_val & photo].mean(axis=0)],
                "upright_radiographs_turned": round(turned_upright, 4),
                "not_xray_accepted": [round(float(v), 4) for v in not_xray_accepted]}
            if (turned_upright <= max_upright_turned and np.all(not_xray_accepted <= allowed_per_turn + 1e-9)
                    and kept > best + 1e-9):
                search, best = (below, upright, vote), kept
    _, seen, accepted_after = decide(refused_floor, trial, not_xray_floor, search)
    curve = {}
    for candidate in (None, 0.9, 0.7, 0.5, 0.4, 0.3):
        _, views, accepted = decide(refused_floor, trial, candidate)
        curve[str(candidate)] = {
            "radiographs_upright_and_accepted": [round(float(v), 4) for v in
                                                 (accepted & (views == 0))[in_val & xray & ~photo].mean(axis=0)],
            "not_xray_accepted": [round(float(v), 4) for v in accepted[in_val & ~xray].mean(axis=0)],
            "ultrasound_accepted": [round(float(v), 4) for v in accepted[in_val & (kind == "ultrasound")].mean(axis=0)]}

    def figures(mask: np.ndarray) -> dict:
        out: dict = {"n": int(mask.sum())}
        if not mask.any():
            return out
        for name, rows_of in (("upright_after", seen == 0), ("gate_accepts_before", accepted_before),
                              ("gate_accepts_after", accepted_after),
                              ("upright_and_accepted_after", accepted_after & (seen == 0))):
            out[name] = {str(t): round(float(rows_of[mask, i].mean()), 4) for i, t in enumerate(TURNS)}
        return out

    def report(which: str) -> dict:
        in_split = split == which
        parts = sorted(set(group[in_split & xray]))
        return {"radiographs": figures(in_split & xray & ~photo),
                "real_photos": figures(in_split & photo),
                "per_part": {p: figures(in_split & (group == p) & ~photo) for p in parts},
                "not_xray": figures(in_split & ~xray)}

    metrics = {"data": "pack manifest: every radiograph of the smaller parts, sampled chest films and non-X-rays "
                       f"({CAPS}), each at 4 turns; fit on train, C and min_probability on val, reported on val "
                       "and test",
               "refused_by_intake": refused,
               "c_search_val_accuracy": {str(c): round(v[0], 4) for c, v in searched.items()},
               "not_xray_floor_curve_val": curve,
               **({"search_curve_val": search_curve} if search_grid else {}),
               "val": report("val"), "test": report("test")}
    fitted = (f"multinomial logistic regression (C={best_c}, chosen from {list(c_grid)} by val accuracy on "
              f"radiographs)" if shipped is None else
              f"the card's head kept as it was (--keep-head; fitted: {shipped.method_notes.split(' on the')[0]})")
    spec = OrientationSpec(
        classes=CLASSES, arrays=AuxiliaryFile(file=ARRAYS_FILE, sha256=""), min_probability=floor,
        min_probability_refused=refused_floor, metrics=metrics,
        confirm_min_probability=trial[0] if trial else None,
        confirm_upright_probability=trial[1] if trial else 0.5, not_xray_min_probability=not_xray_floor,
        search_upright_below=search[0] if search else None, search_upright_probability=search[1] if search else 0.5,
        search_consensus_probability=search[2] if search else None,
        method_notes=(f"{fitted} on the "
                      f"gate's flattened, L2-normalised 1024×4×4 post-ReLU map; {len(fit_y)} train pictures "
                      f"(radiographs at 0/90/180/270 degrees, non-X-rays at every turn as 'not_xray'"
                      f"{'; and their mirror images' if mirrored else ''}); "
                      f"min_probability {floor}: the smallest that turns at most {max_upright_turned:.1%} of the "
                      f"upright val radiographs; min_probability_refused {refused_floor} (pictures the gate refuses "
                      f"as sent): the most val radiographs upright and accepted, with the gate accepting at most "
                      f"{max_extra_accepted:.1%} more val non-X-rays than before any turn; turns on trial "
                      f"{trial} (floor, upright probability of the turned-back view): the most val radiographs "
                      f"upright and accepted within both rules; not_xray_min_probability {not_xray_floor}: the "
                      f"lowest that refuses at most {max_films_refused} of the val radiographs upright and "
                      f"accepted at any turn; search (below, floor, consensus) {search}: the most val "
                      f"radiographs upright and accepted with no more upright val radiographs turned and no "
                      f"more val non-X-rays accepted at any turn; command: python -m "
                      f"training orientation --model models/gate --manifest ../shared/data/xray-pack/manifest.csv"
                      + (" --keep-head" if shipped is not None else f" --c-grid {','.join(str(c) for c in c_grid)}")
                      + (" --mirror" if mirrored else "")
                      + (" --manifest SYNTHETIC/manifest.csv --synthetic" if synthetic else "")
                      + (f" --search-below {','.join(sorted({str(b) for b, _, _ in search_grid}))} --search-floor "
                         f"{','.join(sorted({str(f) for _, f, _ in search_grid}))}" if search_grid else "")
                      + (f" --search-consensus {','.join(sorted({str(v) for _, _, v in search_grid if v}))}"
                         if any(v for _, _, v in search_grid) else "")))
    if write:
        spec.arrays = write_arrays(model, ARRAYS_FILE, {"weight": weight, "bias": bias})
        card.orientation = spec
        write_card(model, card)
    return spec.model_dump(mode="json")


def main(args) -> int:
    from ..data.datasets import load_sources

    return emit_report(run(args.model, load_sources(args.manifest), args.cache, write=not args.dry_run,
                           c_grid=tuple(float(c) for c in args.c_grid.split(",")),
                           max_extra_accepted=args.max_extra_accepted, confirm=not args.no_trial,
                           max_films_refused=None if args.max_films_refused < 0 else args.max_films_refused,
                           search_grid=tuple((float(b), float(f), None if v == "none" else float(v))
                                             for b in args.search_below.split(",") if b
                                             for f in args.search_floor.split(",")
                                             for v in args.search_consensus.split(",")),
                           keep_head=args.keep_head, mirror=args.mirror,
                           synthetic=args.synthetic),
                       args.json)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "orientation",
                        help="forward-pass cache (not the repository)")
    parser.add_argument("--c-grid", default="10,30,100", help="inverse regularisation strengths tried on val")
    parser.add_argument("--max-extra-accepted", type=float, default=0.005,
                        help="val non-X-rays the gate may accept beyond what it accepted before any turn")
    parser.add_argument("--no-trial", action="store_true", help="no turns on trial (confirm_min_probability)")
    parser.add_argument("--max-films-refused", type=float, default=0.002,
                        help="val radiographs the head's not_xray may refuse at any turn (negative: no such rule)")
    parser.add_argument("--search-below", default="",
                        help="upright probabilities below which a picture left as sent is searched, tried on val "
                             "(comma-separated; empty: no search)")
    parser.add_argument("--search-floor", default="0.5,0.7,0.85,0.95",
                        help="upright probabilities a turned-back copy must reach in the search, tried on val")
    parser.add_argument("--search-consensus", default="none",
                        help="posteriors the four views' vote must reach, tried on val ('none': the copy read "
                             "most upright is chosen and pictures the head refuses as sent are not searched)")
    parser.add_argument("--keep-head", action="store_true",
                        help="keep the card's head and floors as they are; choose only the search on val")
    parser.add_argument("--mirror", action="store_true",
                        help="fit the head on the train pictures' mirror images too (at every turn)")
    parser.add_argument("--synthetic", action="store_true",
                        help="fit the head on the synthetic train photos of a --manifest too (synthetic-photos)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="measure only; leave the card alone")
