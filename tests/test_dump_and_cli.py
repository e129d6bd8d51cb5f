"""Graph dumps and the command line."""

import json
import subprocess
import sys

import networkx as nx
import pydot
import pytest
import torch
from helpers import tiny_model

import neuronmm_fx
from neuronmm_fx.cli import main


def test_dump_dir_holds_every_pass_of_every_site(tmp_path):
    model = tiny_model("gpt2")
    neuronmm_fx.optimize(model, ratio=0.2, block=8, dump_dir=tmp_path)
    sites = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert sites == ["00_transformer.h.0.mlp", "01_transformer.h.1.mlp"]
    folder = tmp_path / sites[0]
    for stem in ("0_capture", "1_canonicalize", "2_match", "3_fuse"):
        assert (folder / f"{stem}.txt").is_file() and (folder / f"{stem}.dot").is_file()
    capture = (folder / "0_capture.txt").read_text()
    assert "aten.addmm.default" in capture and "aten.tanh.default" in capture  # Conv1D and spelled-out GELU
    canonical = (folder / "1_canonicalize.txt").read_text()
    assert "aten.addmm" not in canonical and "aten.tanh" not in canonical
    assert "call_function[activation](%dense" in canonical and "gelu_tanh" in canonical
    assert "[in_out]" in canonical  # Conv1D weights are (in, out)
    matched = [line for line in (folder / "2_match.txt").read_text().splitlines() if line.startswith("*")]
    assert len(matched) == 3  # c_fc, the activation, c_proj
    fused = (folder / "3_fuse.txt").read_text()
    assert "neuronmm.svd_mlp" in fused and "dense" not in fused
    assert "installed as module" in (folder / "4_install.txt").read_text()
    (dot,) = pydot.graph_from_dot_file(str(folder / "2_match.dot"))
    graph = nx.nx_pydot.from_pydot(dot)
    assert sum(1 for _, data in graph.nodes(data=True) if data.get("fillcolor") == "lightblue") == 3
    assert "2 site(s) rewritten" in (tmp_path / "discovery.txt").read_text()


def test_cli_help_and_bad_options(capsys):
    result = subprocess.run([sys.executable, "-m", "neuronmm_fx", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "optimize" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "neuronmm_fx", "demo", "--ratio", "abc"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "invalid float value" in result.stderr
    # bad option values are usage errors (exit 2), refused before anything is loaded
    for argv, message in (
        (["demo", "--ratio", "1.5"], "ratio must satisfy 0 < ratio < 1"),
        (["optimize", "/no/such/model"], "no model at /no/such/model"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and f"neuronmm-fx: error: {message}" in capsys.readouterr().err


def test_cli_optimizes_a_saved_model_and_saves_the_result(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    code = main(
        [
            "optimize",
            str(folder),
            "--ratio",
            "0.2",
            "--block",
            "8",
            "--method",
            "svd",
            "--quiet",
            "--save",
            str(tmp_path / "out"),
            "--report-json",
            str(tmp_path / "report.json"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "2 site(s) rewritten" in out and f"compressed model saved to {tmp_path / 'out'}" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["path"] for s in report["sites"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "neuronmm_recipe.json").is_file()
    # the saved folder stands alone: the model comes back from it without the original
    ids = torch.randint(0, 100, (1, 6))
    loaded = neuronmm_fx.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(
            loaded(ids).logits,
            neuronmm_fx.load_compressed(tiny_model("llama", seed=5), tmp_path / "out")(ids).logits,
        )
