"""The kernel benchmark's own checks hold on every shape class it covers (all three LLaMA MLPs, up,
down and whole MLP, trn2 and trn3), at the token counts that keep the suite short."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_traffic.py"


def test_the_benchmark_goals_and_the_planner_hold_on_every_shape(capsys):
    spec = importlib.util.spec_from_file_location("kernel_traffic", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tokens", "1,512,2048", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "fused traffic within 1.10x the bound for every shape with M >= 512: yes" in out
    assert "the pick never moves more than the cheaper of fused and unfused: yes" in out
    assert "planner's traffic equals the stand-in's count in 180/180 runs" in out  # 54 shapes
    assert out.count("| LLaMA-3.1-8B down |") == 6 and out.count("| LLaMA-3.2-3B MLP |") == 6
