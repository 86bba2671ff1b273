"""How the training commands hand back a JSON report: printed, and written to ``--json`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: Any, path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def emit_report(report: Any, path: Path | str | None) -> int:
    """Print ``report`` as JSON (and write it to ``path``); the command's exit status, 0."""
    if path:
        write_report(report, path)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0
