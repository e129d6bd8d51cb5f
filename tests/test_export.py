"""torch.export of optimized models: the neuronmm ops survive export, save and load."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import tiny_decoder

import neuronmm_fx
from neuronmm_fx import export as nx


@pytest.fixture(scope="module")
def optimized():
    return neuronmm_fx.optimize(
        tiny_decoder("llama"), ratio=0.05, block=8, method="svd", allocation="uniform"
    )


IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8]])


def reference(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_export_keeps_the_ops_and_round_trips_through_save_and_load(optimized, tmp_path):
    program = nx.export_causal_lm(optimized, IDS)
    assert nx.neuronmm_ops(program) == {"neuronmm::svd_mlp": 2}
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert len(outputs) == 1  # logits only: no cache object, no ModelOutput
    path = nx.save(program, tmp_path / "model.pt2")
    loaded = nx.load(path)
    assert nx.neuronmm_ops(loaded) == {"neuronmm::svd_mlp": 2}
    with torch.no_grad():
        got = loaded.module()(IDS)
    torch.testing.assert_close(got, reference(optimized), rtol=0, atol=0)


def test_saved_program_loads_in_a_fresh_process(optimized, tmp_path):
    path = nx.save(nx.export_causal_lm(optimized, IDS), tmp_path / "model.pt2")
    torch.save({"ids": IDS, "logits": reference(optimized)}, tmp_path / "io.pt")
    script = (
        "import sys, torch, neuronmm_fx\n"
        "assert 'transformers' not in sys.modules\n"
        f"program = torch.export.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    got = program.module()(io['ids'])\n"
        "torch.testing.assert_close(got, io['logits'], rtol=0, atol=0)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_dynamic_sequence_length(optimized):
    program = nx.export_causal_lm(optimized, IDS, dynamic_sequence=True)
    longer = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        got = program.module()(longer)
    torch.testing.assert_close(got, reference(optimized, longer), rtol=1e-5, atol=1e-5)


def test_plain_module_export_and_readable_error():
    mlp = neuronmm_fx.optimize(
        torch.nn.Sequential(torch.nn.Linear(64, 160), torch.nn.GELU(), torch.nn.Linear(160, 64)),
        0.05,
        block=8,
    )
    x = torch.randn(3, 64)
    program = nx.export(mlp, (x,))
    assert nx.neuronmm_ops(program) == {"neuronmm::svd_mlp": 1}
    torch.testing.assert_close(program.module()(x), mlp(x))
    with pytest.raises(neuronmm_fx.CaptureError, match="torch.export could not capture"):
        nx.export(mlp, (torch.randn(3, 5),))
