"""Standalone checkpoints: ``save_compressed`` writes the config (and tokenizer), ``from_pretrained``
rebuilds the model from the folder alone, without allocating a dense MLP weight."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import model_output, tiny_llama, tiny_model, token_ids
from torch.utils._python_dispatch import TorchDispatchMode

import neuronmm_fx
from neuronmm_fx.checkpoint import CONFIG_FILE, RECIPE_FILE, CheckpointError
from neuronmm_fx.modules import CompressedMLP

HIDDEN, WIDE = 64, 512  # a wide MLP, so that its dense weights dwarf the factors


def _fresh_process_logits(folder: Path, ids: torch.Tensor, out: Path) -> None:
    """Load ``folder`` with ``from_pretrained`` in a new interpreter and save its logits on ``ids``."""
    torch.save(ids, out.with_suffix(".ids"))
    script = textwrap.dedent(
        f"""
        import torch, neuronmm_fx
        model = neuronmm_fx.from_pretrained({str(folder)!r})
        ids = torch.load({str(out.with_suffix(".ids"))!r})
        with torch.no_grad():
            torch.save(model(ids).logits, {str(out)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_fresh_process_rebuilds_the_model_from_the_folder_bit_for_bit(tmp_path):
    model = neuronmm_fx.optimize(tiny_model("qwen3"), ratio=0.2, block=8, method="svd", allocation="uniform")
    neuronmm_fx.save_compressed(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and "quantization_config" not in config
    ids = token_ids()
    _fresh_process_logits(tmp_path / "out", ids, tmp_path / "logits.pt")
    assert torch.equal(torch.load(tmp_path / "logits.pt"), model_output(model, ids))

    loaded = neuronmm_fx.from_pretrained(tmp_path / "out")  # and here, for the structure
    assert type(loaded).__name__ == "Qwen3ForCausalLM" and not loaded.training
    mlps = [m for m in loaded.modules() if isinstance(m, CompressedMLP)]
    assert len(mlps) == len(model.model.layers) and all(m.shares_first for m in mlps)
    report, saved_report = neuronmm_fx.report_of(loaded), neuronmm_fx.report_of(model)
    assert report.params_removed == saved_report.params_removed
    with torch.no_grad():
        generated = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
        expected = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


class _Allocations(TorchDispatchMode):
    """Shapes and bytes of every tensor a factory op creates off the meta device."""

    FACTORIES = ("empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "normal", "uniform")

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name in self.FACTORIES and isinstance(out, torch.Tensor) and not out.is_meta:
            self.shapes.append(tuple(out.shape))
            self.bytes += out.numel() * out.element_size()
        return out


def test_loading_never_allocates_a_dense_mlp_weight(tmp_path):
    model = neuronmm_fx.optimize(
        tiny_llama(intermediate_size=WIDE), ratio=0.5, block=8, method="svd", allocation="uniform"
    )
    neuronmm_fx.save_compressed(model, tmp_path)
    saved_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dense_mlp_bytes = len(model.model.layers) * 3 * HIDDEN * WIDE * 4

    with _Allocations() as allocations:
        loaded = neuronmm_fx.from_pretrained(tmp_path)
    dense_shapes = {(WIDE, HIDDEN), (HIDDEN, WIDE)}
    assert not dense_shapes & set(allocations.shapes), "a dense MLP weight was allocated"
    # what is allocated is the checkpoint's tensors and the rotary tables, not the dense model
    assert allocations.bytes < saved_bytes + dense_mlp_bytes / 4
    # building the dense model instead would have allocated those weights: the check can fail
    with _Allocations() as dense_build:
        tiny_llama(intermediate_size=WIDE)
    assert dense_shapes & set(dense_build.shapes) and dense_build.bytes > saved_bytes + dense_mlp_bytes / 4
    ids = token_ids()
    assert torch.equal(model_output(loaded, ids), model_output(model, ids))


def test_folders_that_cannot_stand_alone_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is not a neuronmm_fx checkpoint"):
        neuronmm_fx.from_pretrained(tmp_path / "nowhere")

    # a bare module has no Hugging Face config: it saves, but only load_compressed can read it
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    mlp = neuronmm_fx.optimize(mlp, ratio=0.2, block=8, example_inputs=(torch.randn(3, 64),))
    neuronmm_fx.save_compressed(mlp, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="saved without the model's config.*load_compressed"):
        neuronmm_fx.from_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="tokenizer is saved beside a Hugging Face model's config"):
        neuronmm_fx.save_compressed(mlp, tmp_path / "bare_tok", tokenizer=object())
    assert not (tmp_path / "bare_tok").exists()  # refused before anything was written

    model = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.2, block=8, method="svd")
    neuronmm_fx.save_compressed(model, tmp_path / "edited")
    config_path = tmp_path / "edited" / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="config.json is missing or was changed after saving"):
        neuronmm_fx.from_pretrained(tmp_path / "edited")
    config_path.unlink()
    with pytest.raises(CheckpointError, match="config.json is missing or was changed after saving"):
        neuronmm_fx.from_pretrained(tmp_path / "edited")

    neuronmm_fx.save_compressed(model, tmp_path / "renamed")
    recipe_path = tmp_path / "renamed" / RECIPE_FILE
    recipe = json.loads(recipe_path.read_text())
    recipe_path.write_text(json.dumps({**recipe, "standalone": {**recipe["standalone"], "config": "x"}}))
    with pytest.raises(CheckpointError, match="was edited after saving"):  # the note is sealed
        neuronmm_fx.from_pretrained(tmp_path / "renamed")


def test_the_bundled_model_saves_with_its_tokenizer_and_loads_alone(tmp_path):
    from transformers import AutoTokenizer

    from neuronmm_fx.models import load_smollm2

    model, tokenizer = load_smollm2()
    assert getattr(model.config, "quantization_config", None) is not None  # GGUF: transformers refuses it
    model = neuronmm_fx.optimize(model, ratio=0.2, method="svd", allocation="uniform")
    neuronmm_fx.save_compressed(model, tmp_path / "out", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    recipe = json.loads((tmp_path / "out" / RECIPE_FILE).read_text())
    assert "tokenizer_config.json" in recipe["standalone"]["tokenizer_files"]

    prompt = "The capital of France is"
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "out"))(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer(prompt, return_tensors="pt").input_ids)
    _fresh_process_logits(tmp_path / "out", ids, tmp_path / "logits.pt")
    assert torch.equal(torch.load(tmp_path / "logits.pt"), model_output(model, ids))
