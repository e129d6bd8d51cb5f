"""The README's five-minute tour runs as written, on a tiny model instead of the bundled one.

Substitutions, and only these: ``smollm2`` becomes a tiny LLaMA folder (with a word-level
tokenizer), ``out``/``out-copy``/``ranks.png``/``FILE`` paths in a temporary folder; the tiny model
needs ``--block 8`` to have anything to compress, and ``bench`` runs one short round.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from helpers import WORDS, tiny_model, word_tokenizer

import neuronmm_fx
from neuronmm_fx.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TOUR = README.read_text().split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
COMMANDS = [
    line.split("  #")[0].strip() for line in re.findall(r"```bash\n(.*?)```", TOUR, re.S)[0].splitlines()
]
PYTHON = re.findall(r"```python\n(.*?)```", TOUR, re.S)[0]
EXTRA = {
    "compress": ["--block", "8", "--quiet"],
    "bench": ["--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1"],
}


def test_the_tour_lists_every_tool():
    tools = [shlex.split(command)[1] for command in COMMANDS]
    assert tools == ["inspect", "compress", "inspect", "eval", "eval", "bench"]
    assert all(word in PYTHON for word in ("from_pretrained", "torch.compile", "save_compressed"))


def test_the_tour_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    word_tokenizer().save_pretrained(dense)
    generator = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text(
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (300,), generator=generator))
    )
    monkeypatch.chdir(tmp_path)  # out, ranks.png and out-copy land here, as in the tour
    for command in COMMANDS:
        argv = [str(dense) if word == "smollm2" else word for word in shlex.split(command)[1:]]
        argv = ["text.txt" if word == "FILE" else word for word in argv]
        argv += EXTRA.get(argv[0], [])
        assert main(argv) == 0, command
    assert (tmp_path / "out" / "neuronmm_recipe.json").is_file() and (tmp_path / "ranks.png").is_file()
    output = capsys.readouterr().out
    assert (
        "2 site(s) to compress" in output
        and "mean KL(dense ‖ model)" in output
        and "lm-eval neuronmm_text" in output
        and "model compiled" in output
    )

    namespace: dict = {}
    exec(compile(PYTHON, "README.md:tour", "exec"), namespace)
    ids = torch.randint(2, len(WORDS), (1, 6), generator=generator)
    copy = neuronmm_fx.from_pretrained(tmp_path / "out-copy")
    with torch.no_grad():
        expected = namespace["model"](ids).logits
        assert torch.equal(copy(ids).logits, expected)
        torch.testing.assert_close(namespace["compiled"](ids).logits, expected, rtol=1e-5, atol=1e-5)
