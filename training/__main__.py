"""`python -m training COMMAND`: the one entry for every step of the recipe.

data: synthetic-photos · fit: train, heads, top, part-top, gate-top · card: export, calibrate, open-set, modality,
orientation, heatmap-baseline, import-torchxrayvision · measure: evaluate, measure-replies, measure-routing,
measure-photos, measure-quality, measure-gate-refit, measure-glare, measure-heatmaps (bench/heatmaps.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from contract.envelope import MODES
from contract.settings import BACKENDS

from .measure.reports import emit_report, write_report

# Commands whose module keeps its own argparse: `python -m training NAME ARGS…` runs that module's main(ARGS).
DELEGATED = {
    "synthetic-photos": ("training.data.synthetic_photos", "turn radiographs into synthetic phone photos of a film"),
    "heads": ("training.fit.heads", "chest: linear heads on the frozen pooled features (cached forward passes)"),
    "top": ("training.fit.top", "chest: fine-tune the network's top on cached inputs (soups too)"),
    "part-top": ("training.fit.part_top", "body part: fine-tune the network's top on cached inputs, photos among them"),
    "gate-top": ("training.fit.gate_top", "gate: fine-tune the network's top on cached inputs at four turns"),
    "measure-photos": ("training.measure.photos", "phone photos of films: do the models cope, does rectify help"),
    "measure-quality": ("training.measure.quality", "how often the quality check refuses real radiographs / bad shots"),
    "measure-glare": ("training.measure.glare", "does the quality check catch a lamp's reflection on a film"),
    "measure-routing": ("training.measure.routing", "what the reply names, per part, source, photo and turn"),
    "measure-gate-refit": ("training.measure.gate_refit",
                           "gate: would refitting only its last layer with photos let more photos through"),
    "heatmap-baseline": ("training.card.heatmap_baseline",
                         "chest: overlays relative to normal films (mean normal evidence map + colour scale)"),
    "measure-heatmaps": ("bench.heatmaps", "blank heatmap panels, panels per film, overlay size and time"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=summary, add_help=False)

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--manifest", action="append", default=[], help="xray-pack style manifest.csv")
        p.add_argument("--chestxray14", action="append", default=[], help="NIH ChestX-ray14 root folder")
        p.add_argument("--mura", action="append", default=[], help="MURA root folder")
        p.add_argument("--folders", action="append", default=[], help="folder-per-class tree")

    t = commands.add_parser("train", help="train gate, body_part or chest")
    t.add_argument("--task", required=True, choices=["gate", "body_part", "chest"])
    t.add_argument("--out", required=True, type=Path, help="run folder (checkpoints; resumes if present)")
    data_args(t)
    t.add_argument("--size", type=int, default=128)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--optimizer", choices=["adam", "radam"])
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    t.add_argument("--plateau-patience", type=int, default=3)
    t.add_argument("--plateau-factor", type=float, default=0.1)
    t.add_argument("--epoch-size", type=int, help="samples per epoch (default: all train rows)")
    t.add_argument("--no-balance", action="store_true", help="sample uniformly instead of per group")
    t.add_argument("--group-share", action="append", default=[], metavar="GROUP=SHARE",
                   help="with balancing: a group's share of each epoch (default 1 each); chest groups are "
                        "sources, e.g. --group-share covid_radiography=0.1")
    t.add_argument("--min-count", type=int, default=30, help="body_part: min train images per part")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init-from", type=Path, help="model folder or run folder to take the backbone from")
    t.add_argument("--imagenet-weights", type=Path, help="torchvision DenseNet-121 ImageNet weights (.safetensors)")
    t.add_argument("--device", default="auto")
    t.add_argument("--val-limit", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (GPU machines: 8+)")
    t.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this budget")
    t.add_argument("--quarter-turns", type=float, default=0.0,
                   help="share of train images turned by 90/180/270 degrees (val then shown turned too)")
    t.add_argument("--turn-loss", type=float, default=0.0,
                   help="with --quarter-turns: weight of a loss asking the final feature map for the turn")

    x = commands.add_parser("export", help="run folder → models/<name> (weights + card with test metrics)")
    x.add_argument("--run", required=True, type=Path)
    x.add_argument("--out", required=True, type=Path)
    data_args(x)
    x.add_argument("--device", default="auto")
    x.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    x.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="how val/test images are run (onnx: ONNX Runtime on the CPU, faster there)")
    x.add_argument("--flip-average", action="store_true",
                   help="test-time augmentation: average logits with the mirror image (measure on val first)")

    e = commands.add_parser("evaluate", help="metrics of a model folder on a split")
    e.add_argument("--model", required=True, type=Path)
    data_args(e)
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.add_argument("--plots", type=Path, help="folder for ROC / confusion PNGs")
    e.add_argument("--device", default="auto")
    e.add_argument("--backend", choices=[b for b in BACKENDS if b != "eager"], default="torch",
                   help="how images are run (onnx: ONNX Runtime on the CPU, as the worker can; openvino-bf16:"
                        " OpenVINO at bf16, to measure what bf16 costs in accuracy)")
    e.add_argument("--bootstrap-rounds", type=int, default=1000, help="chest: resamples for the 95 %% intervals")

    c = commands.add_parser("calibrate", help="chest: Platt calibration + screening/clinician/verdict operating "
                                              "points chosen on val, written into the card")
    c.add_argument("--model", required=True, type=Path)
    data_args(c)
    c.add_argument("--cache", type=Path,
                   help="folder for the cached raw outputs (.npz; default: calibrate/ in $XRAY_CACHE_DIR or "
                        "~/.cache/xray-second-opinion)")
    c.add_argument("--backend", choices=["torch", "onnx"], default="onnx")
    c.add_argument("--threads", type=int)
    c.add_argument("--auc-floor", type=float, default=0.70,
                   help="screening: a label is eligible when its val AUC's 95 %% bootstrap lower bound exceeds this")
    c.add_argument("--normal-flag-rate", type=float, default=0.10,
                   help="screening: at most this share of val normal films may get any flag")
    c.add_argument("--min-ppv", type=float, default=0.10,
                   help="screening: a label whose val PPV at its point is below this is not flagged")
    c.add_argument("--verdict-normal-rate", type=float, default=0.15,
                   help="verdict: at most this share of val normal films hear 'worth showing a doctor soon'")
    c.add_argument("--urgent-ppv", type=float, default=0.5,
                   help="urgent wording only when the val PPV's 95 %% Wilson lower bound reaches this")
    c.add_argument("--clinician-min-specificity", type=float, default=0.85,
                   help="clinician: every ▲ point keeps at least this val specificity")
    c.add_argument("--clinician-flags-per-normal", type=float, default=0.5,
                   help="clinician: at most this many ▲ per val normal film, all labels together")
    c.add_argument("--clinician-only", action="store_true",
                   help="refit the clinician points only, on the card's own calibration: calibration, ECE, "
                        "screening points and verdict stay exactly as they are")
    c.add_argument("--bootstrap-rounds", type=int, default=1000)
    c.add_argument("--dry-run", action="store_true", help="print, do not write the card")

    r = commands.add_parser("measure-replies", help="chest: what the real pipeline flags (screening or clinician mode)")
    data_args(r)
    r.add_argument("--models", type=Path, help="models folder (default: the repository's models/)")
    r.add_argument("--split", default="test", choices=["val", "test"])
    r.add_argument("--mode", default=MODES[0], choices=list(MODES))
    r.add_argument("--backend", choices=["torch", "onnx"], default="onnx")
    r.add_argument("--threads", type=int)
    r.add_argument("--limit", type=int, help="first N films only (a quick look)")
    r.add_argument("--json", type=Path, help="write the figures here")

    i = commands.add_parser("import-torchxrayvision", help="convert torchxrayvision DenseNet weights to a card")
    i.add_argument("--weights", required=True, help="e.g. densenet121-res224-nih, or a local weights file")
    i.add_argument("--out", required=True, type=Path)
    i.add_argument("--cache-dir", help="torchxrayvision weights folder (default: its own cache)")

    from .card import modality, open_set, orientation

    o = commands.add_parser("open-set", help="body part: fit the unknown-part check and the chest floor")
    open_set.add_arguments(o)
    m = commands.add_parser("modality", help="gate: fit the head that names CT / MRI / ultrasound / not medical")
    modality.add_arguments(m)
    o = commands.add_parser("orientation", help="gate: fit the head that turns a sideways or upside-down film upright")
    orientation.add_arguments(o)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.command == "import-torchxrayvision":
        from .card.import_xrv import import_torchxrayvision

        card = import_torchxrayvision(args.weights, args.out, args.cache_dir)
        print(f"wrote {args.out} ({len(card.labels)} labels)")
        return 0

    if args.command == "open-set":
        return open_set.main(args)
    if args.command == "modality":
        return modality.main(args)
    if args.command == "orientation":
        return orientation.main(args)

    import torch

    from .data.datasets import load_sources

    records = load_sources(args.manifest, args.chestxray14, args.mura, args.folders)
    data_name = ", ".join(args.manifest + args.chestxray14 + args.mura + args.folders)
    if args.command == "calibrate":
        from diagnosis.config import cache_dir_from_environment

        from .card.calibrate import calibrate, summary

        cache = args.cache or cache_dir_from_environment() / "calibrate"
        data = " + ".join(f"{Path(m).parent.name}/{Path(m).name}" for m in args.manifest) or data_name
        card = calibrate(args.model, records, data, cache, args.backend, args.threads,
                         write=not args.dry_run, clinician_only=args.clinician_only, auc_floor=args.auc_floor,
                         normal_flag_rate=args.normal_flag_rate,
                         min_ppv=args.min_ppv,
                         verdict_normal_rate=args.verdict_normal_rate, urgent_ppv=args.urgent_ppv,
                         bootstrap_rounds=args.bootstrap_rounds,
                         clinician_min_specificity=args.clinician_min_specificity,
                         clinician_flags_per_normal=args.clinician_flags_per_normal)
        print(json.dumps(summary(card), indent=1))
        return 0
    if args.command == "measure-replies":
        from .measure.replies import measure, print_table

        report = measure(records, args.models, args.split, args.mode, args.backend, args.threads, args.limit)
        print_table(report)
        if args.json:
            write_report(report, args.json)
        return 0
    if args.command == "train":
        from .data.tasks import make_task
        from .fit.train import RECIPES, TrainConfig, train

        if args.threads:
            torch.set_num_threads(args.threads)
        recipe = RECIPES[args.task]
        config = TrainConfig(
            task=args.task, out=args.out, size=args.size, batch_size=args.batch_size,
            epochs=args.epochs or recipe["epochs"], optimizer=args.optimizer or recipe["optimizer"],
            lr=args.lr or recipe["lr"], weight_decay=args.weight_decay if args.weight_decay is not None
            else recipe["weight_decay"], betas=tuple(args.betas), plateau_patience=args.plateau_patience,
            plateau_factor=args.plateau_factor, epoch_size=args.epoch_size, balance=not args.no_balance,
            group_shares={g: float(v) for g, v in (item.split("=", 1) for item in args.group_share)},
            seed=args.seed, init_from=args.init_from, imagenet_weights=args.imagenet_weights,
            device=args.device, val_limit=args.val_limit, num_workers=args.workers, max_minutes=args.max_minutes,
            quarter_turns=args.quarter_turns, turn_loss=args.turn_loss, extra={"data": data_name},
        )
        train(config, make_task(args.task, records, args.min_count), records)
        return 0
    if args.command == "export":
        from .card.export import export_run

        card = export_run(args.run, args.out, records, data_name, args.device, getattr(torch, args.dtype),
                          args.flip_average, args.backend)
        print(json.dumps(card.metrics["test"], indent=1))
        return 0
    from .measure.evaluate import evaluate_model

    report = evaluate_model(args.model, records, args.split, args.device, plots=args.plots,
                            bootstrap_rounds=args.bootstrap_rounds, backend=args.backend)
    return emit_report(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
