"""benchmarks/gpu_check.py (`make gpu-check`): its refusal without CUDA, its MAP comparison and
JUnit parsing, and a whole --device cpu --tiny run with every section in its JSON report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: timing.py, bench_*.py
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_refuses_in_one_line_without_cuda(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 1
    assert gpu_check.main(["--device", "cpu"]) == 1  # CPU only as the tiny smoke run
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["gpu_check: no CUDA device here; for a CPU smoke run of this script use --device cpu --tiny",
                                "gpu_check: --device cpu runs only with --tiny (full sizes take hours on a CPU)"]


def test_map_comparison(gpu_check):
    fp32 = {"16 i2t map@50": 0.40, "16 i2t map@all": 0.25}
    assert gpu_check.outside_tolerance(fp32, {"16 i2t map@50": 0.419, "16 i2t map@all": 0.231}, 0.02) == []
    assert gpu_check.outside_tolerance(fp32, {"16 i2t map@50": 0.43, "16 i2t map@all": 0.25}, 0.02) == ["16 i2t map@50: 0.4300 vs 0.4000"]
    assert gpu_check.outside_tolerance(fp32, {"16 i2t map@50": float("nan"), "16 i2t map@all": 0.25}, 0.02) == ["16 i2t map@50: nan vs 0.4000"]
    assert gpu_check.outside_tolerance(fp32, {"16 i2t map@all": 0.25}, 0.02) == ["16 i2t map@50: missing"]
    map_json = {"16": {"strict": {"i2t": {"map@50": 0.4, "map@all": 0.2}, "t2i": {"map@50": 0.3, "map@all": 0.1}},
                       "paired": {"i2t": {"map@50": 0.9, "map@all": 0.9}, "t2i": {"map@50": 0.9, "map@all": 0.9}}}}
    assert gpu_check.strict_maps(map_json, [16]) == {"16 i2t map@50": 0.4, "16 i2t map@all": 0.2, "16 t2i map@50": 0.3, "16 t2i map@all": 0.1}


def test_junit_outcomes(gpu_check, tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_a" name="test_ok" time="0.1"/>
        <testcase classname="tests.test_a" name="test_skip"><skipped message="needs a CUDA device"/></testcase>
        <testcase classname="tests.test_b" name="test_fail"><failure message="boom"/></testcase>
        <testcase classname="tests.test_b" name="test_error"><error message="setup"/></testcase>
        </testsuite></testsuites>""")
    assert gpu_check.junit_outcomes(path) == {"tests.test_a::test_ok": "passed", "tests.test_a::test_skip": "skipped",
                                              "tests.test_b::test_fail": "failed", "tests.test_b::test_error": "failed"}


@pytest.mark.slow
def test_tiny_cpu_run_end_to_end(tmp_path):
    out = tmp_path / "report.json"
    committed = (REPO / "metrics" / "map.json").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", out, "--work-dir", tmp_path / "work"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"environment", "checks", "cuda_tests", "evaluation", "extraction", "training", "pipeline", "ok"} <= report.keys()
    assert report["ok"] is True and all(c["ok"] for c in report["checks"])
    assert all("error" not in report[name] for name in ("cuda_tests", "evaluation", "extraction", "training", "pipeline"))
    # the CUDA-only tests are found (this file's neighbours mark some) and, without CUDA, all skipped
    assert report["cuda_tests"]["skipped"] == len(report["cuda_tests"]["tests"]) > 0
    assert "tests.test_ranking_torch::test_matches_numpy_on_cuda[64]" in report["cuda_tests"]["tests"]
    runs = report["pipeline"]["runs"]
    assert "fp16 needs a CUDA device" in runs["fp16"]["skipped"]  # what a CPU cannot do is skipped, and says why
    for precision in ("fp32", "bf16"):
        assert set(runs[precision]["seconds"]) == {"extract", "baselines", "train-fusion", "train-hash", "evaluate"}
        assert len(runs[precision]["map"]) == 2 * 2 * 2  # code lengths x directions x (MAP@50, MAP@all)
        assert runs[precision]["evaluate_vs_numpy"] <= 1e-9
        assert (tmp_path / "work" / precision / "metrics" / "map.json").is_file()
    assert report["evaluation"]["max_abs_difference"] <= 1e-9
    assert set(report["extraction"]["precisions"]) == {"fp32", "bf16", "fp16"}
    assert {(r["task"], r["bits"]) for r in report["training"]["rows"]} == {(0, None), (1, 16), (1, 32), (1, 64), (1, 128)}
    assert "| check | result | detail |" in proc.stdout and "| bits | direction | metric | fp32 | bf16 | fp16 |" in proc.stdout
    assert (REPO / "metrics" / "map.json").stat().st_mtime_ns == committed  # the stages wrote into the work folder only
