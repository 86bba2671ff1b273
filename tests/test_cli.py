import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, encode, gradient
from PIL import Image


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diagnosis.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_cli_json_lines_overlays_and_failures(fake_models, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.fromarray(gradient(texture=True)), "PNG"))
    no_extension = tmp_path / "scan"
    no_extension.write_bytes(encode(Image.fromarray(gradient(texture=True)), "JPEG"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    proc = run_cli(str(good), str(broken), str(no_extension), str(tmp_path / "missing.png"),
                   "--json", "--out", str(out), "--models", str(fake_models))
    assert proc.returncode == 1, proc.stderr  # some inputs failed; the others still ran
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(good), str(broken), str(no_extension),
                                                str(tmp_path / "missing.png")]
    keys = {"file", "is_xray", "xray_probability", "body_part", "body_part_probability", "findings", "message",
            "overlay", "timings_ms"}
    for line in lines:
        assert keys <= line.keys()
    first = lines[0]
    assert first["is_xray"] is True and first["body_part"] == "chest"
    assert {"label", "probability", "positive"} <= first["findings"][0].keys()
    # One file per drawn finding, in drawn order, named <stem>_heatmap_<n>_<label>.jpg.
    expected = [str(out / f"good_heatmap_{n}_{label}.jpg") for n, label in enumerate(first["heatmap_labels"], 1)]
    assert 1 <= len(expected) <= 3 and first["overlays"] == expected and first["overlay"] == expected[0]
    assert all((out / name).is_file() for name in expected)
    assert sorted(p.name for p in out.glob("good_*")) == sorted(Path(e).name for e in expected)
    assert lines[1]["findings"] == [] and lines[1]["overlay"] is None
    assert "damaged" in lines[1]["message"] or "recognise" in lines[1]["message"]
    assert lines[2]["body_part"] == "chest"  # no extension: content decides
    assert "could not be read" in lines[3]["message"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_readable_report_in_russian(fake_models, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(encode(Image.fromarray(gradient(texture=True)), "PNG"))
    proc = run_cli(str(image), "--models", str(fake_models), "--language", "ru")
    assert proc.returncode == 0, proc.stderr
    assert "body part: chest" in proc.stdout and "врачу" in proc.stdout


def test_cli_refuses_a_broken_models_folder(tmp_path):
    proc = run_cli(str(tmp_path / "x.png"), "--models", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "cannot load models" in proc.stderr


def test_cli_mode_and_operating_point_figures(fake_models, tmp_path):
    image = tmp_path / "chest.png"
    image.write_bytes(encode(Image.fromarray(gradient(texture=True)), "PNG"))
    lines = {}
    for mode in ("screening", "clinician"):
        args = [str(image), "--json", "--models", str(fake_models)] + (["--mode", mode] if mode != "screening" else [])
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        lines[mode] = json.loads(proc.stdout)
    assert lines["screening"]["mode"] == "screening" and lines["clinician"]["mode"] == "clinician"
    for line in lines.values():
        assert line["verdict"] == "see_doctor" and line["verdict_point"]["threshold"] == 0.5
        finding = line["findings"][0]
        assert {"label", "probability", "positive", "threshold", "sensitivity", "specificity", "ppv", "auc",
                "eligible"} <= finding.keys()
    assert {f["label"] for f in lines["screening"]["findings"] if f["positive"]} == {"Effusion", "Cardiomegaly"}
    assert "All findings" in lines["clinician"]["message"] and "All findings" not in lines["screening"]["message"]
