"""The command-line tools on a tiny model: compress, inspect, eval; exit codes and output fields."""

import json

import pytest
import torch
from helpers import WORDS, tiny_model, word_tokenizer

import neuronmm_fx
from neuronmm_fx.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny dense LLaMA folder with its tokenizer, its compressed checkpoint, and a text file."""
    root = tmp_path_factory.mktemp("tools")
    tiny_model("llama").save_pretrained(root / "dense")
    tiny_model("qwen3").save_pretrained(root / "other")
    word_tokenizer().save_pretrained(root / "dense")
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(0, len(WORDS), (600,), generator=generator).tolist()
    (root / "text.txt").write_text(" ".join(WORDS[i] for i in words))
    args = ["compress", str(root / "dense"), "--ratio", "0.2", "--block", "8", "--method", "svd"]
    assert main([*args, "--allocation", "uniform", "--quiet", "--save", str(root / "out")]) == 0
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "neuronmm_recipe.json").write_text("{ not json")
    return root


def test_compress_saves_a_folder_that_stands_alone_with_its_tokenizer(saved):
    assert (saved / "out" / "tokenizer.json").is_file() and (saved / "out" / "config.json").is_file()


def test_inspect_prints_the_report_and_its_json_fields(saved, capsys):
    capsys.readouterr()
    assert main(["inspect", str(saved / "out")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM, recipe format 4" in out and "model.layers.0.mlp" in out
    assert main(["inspect", str(saved / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_class"] == "LlamaForCausalLM" and report["standalone"] is True
    matrices = [m for site in report["sites"] for m in site["matrices"]]
    assert len(matrices) == 2 * 3
    assert all({"name", "in_features", "out_features", "rank", "method"} <= set(m) for m in matrices)
    # the uniform rule at ratio 0.2 on 64×128 matrices, block 8: 80 % of 64·128/(64+128) = 34.1 → 32
    assert {m["method"] for m in matrices} == {"svd"} and {m["rank"] for m in matrices} == {32}


def test_inspect_of_a_dense_model_lists_the_sites_to_compress_and_changes_nothing(saved, capsys, tmp_path):
    from neuronmm_fx import survey

    capsys.readouterr()
    assert main(["inspect", str(saved / "dense"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["compressed"] is False and described["model_class"] == "LlamaForCausalLM"
    assert [site["path"] for site in described["sites"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    matrices = [m for site in described["sites"] for m in site["matrices"]]
    assert [(m["role"], m["in_features"], m["out_features"]) for m in matrices[:3]] == [
        ("gate", 64, 128),
        ("up", 64, 128),
        ("down", 128, 64),
    ]
    # 42·(64+128) = 8064 < 64·128 = 8192 ≤ 43·(64+128): rank 42 is the last that saves parameters
    assert {m["break_even_rank"] for m in matrices} == {42} and {m["rank"] for m in matrices} == {None}
    assert described["site_params"] == 6 * 64 * 128 == sum(m["params"] for m in matrices)
    assert described["model_params"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert main(["inspect", str(saved / "dense"), "--plot", str(tmp_path / "sites.png")]) == 0
    out = capsys.readouterr().out
    assert "2 site(s) to compress" in out and "not compressed" in out
    assert (tmp_path / "sites.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    found = survey(model, exclude=("*layers.0*",))
    assert [site.path for site in found.sites] == ["model.layers.1.mlp"]
    assert [(s.path, s.reason) for s in found.skipped] == [
        ("model.layers.0.mlp", "excluded by pattern '*layers.0*'")
    ]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))
    from neuronmm_fx.plots import plot_survey

    figure = plot_survey(found, tmp_path / "one.png")
    for axes in figure.axes:
        assert axes.get_title() and axes.get_xlabel() and axes.get_ylabel()
    assert sorted(round(p.get_height()) for p in figure.axes[0].patches) == [42, 42, 42, 64, 64, 64]
    with pytest.raises(neuronmm_fx.NothingToCompressError, match="not matched by include=\\['nowhere'\\]"):
        survey(model, include=("nowhere",))


def test_eval_against_the_dense_model_prints_its_json_fields(saved, capsys):
    from neuronmm_fx import from_pretrained
    from neuronmm_fx.evaluate import perplexity

    capsys.readouterr()
    args = ["eval", str(saved / "out"), "--against", str(saved / "dense"), "--text", str(saved / "text.txt")]
    assert main([*args, "--seq-len", "64", "--json", "--quiet"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert {"perplexity", "dense_perplexity", "kl", "top1", "tokens"} <= set(figures)
    assert 0 < figures["kl"] and 0 <= figures["top1"] <= 1
    ids = word_tokenizer()((saved / "text.txt").read_text(), return_tensors="pt").input_ids[0]
    assert ids.numel() == 600
    expected = perplexity(from_pretrained(saved / "out"), ids, seq_len=64)
    assert figures["tokens"] == expected.tokens
    assert figures["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert figures["kl"] > 1e-5  # the compressed model differs from the dense one it is compared with
    # the dense perplexity comes from the same pass as the KL, and equals the dense model's own
    dense_expected = perplexity(tiny_model("llama"), ids, seq_len=64).perplexity
    assert figures["dense_perplexity"] == pytest.approx(dense_expected, rel=1e-5)

    assert main(["eval", str(saved / "dense"), "--text", str(saved / "text.txt"), "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert f"over {expected.tokens} tokens" in out and "KL" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{root}/nowhere"], "no model at {root}/nowhere"),
        (["inspect", "{root}/empty"], "is neither a compressed checkpoint (no neuronmm_recipe.json) nor"),
        (["inspect", "{root}/text.txt"], "is a file but not a .gguf model"),
        (["inspect", "{root}/broken"], "is not a neuronmm_fx checkpoint (needs"),
        (["eval", "{root}/out", "--text", "{root}/missing.txt"], "--text {root}/missing.txt is not a file"),
        (["eval", "{root}/out", "--text", "{root}/text.txt", "--tokens", "1"], "must be at least 2"),
        (["compress", "{root}/out"], "is already a compressed checkpoint"),
        (["eval", "{root}/out", "--text", "{root}/out/model.safetensors"], "is not UTF-8 text"),
        (
            ["eval", "{root}/out", "--against", "{root}/other", "--text", "{root}/text.txt"],
            "another architecture",
        ),
    ],
)
def test_bad_input_is_one_line_with_the_right_exit_code(saved, capsys, argv, message):
    argv = [part.format(root=saved) for part in argv]
    message = message.format(root=saved)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # refused by the parser's checks: usage error
        code = exit_info.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err
    refused_after_loading = ("not a neuronmm_fx checkpoint", "UTF-8", "another architecture")
    assert code == (1 if any(reason in message for reason in refused_after_loading) else 2)
    assert err.count("neuronmm-fx: error:") == 1


def test_bench_times_every_variant_against_the_dense_model(saved, capsys):
    capsys.readouterr()
    args = ["bench", str(saved / "out"), "--against", str(saved / "dense"), "--prompt-tokens", "8"]
    assert main([*args, "--new-tokens", "3", "--repeats", "3", "--no-compile", "--json", "--quiet"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["baseline"] == "dense eager" and set(figures["variants"]) == {"dense eager", "model eager"}
    fields = {"prefill_ms", "prefill_range_ms", "decode_ms", "decode_range_ms", "prefill_speedup"}
    for latency in figures["variants"].values():
        assert fields <= set(latency) and latency["prefill_ms"] > 0 and latency["decode_ms"] > 0
        low, high = latency["prefill_range_ms"]
        assert low <= latency["prefill_ms"] <= high
    assert figures["variants"]["dense eager"]["prefill_speedup"] == 1.0  # the baseline against itself
    assert figures["flop_ideal"] > 1 and figures["weight_bytes_ideal"] > 1  # the factors are smaller


def test_bench_compiles_the_compressed_model_with_the_backend(saved, capsys):
    from neuronmm_fx import backend

    backend.clear_records()
    capsys.readouterr()
    args = ["bench", str(saved / "out"), "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1"]
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "model compiled" in out and "model: compiled and eager greedy tokens equal" in out
    assert backend.records() and all(r.count("svd_mlp") == 2 for r in backend.records())


def test_plots_have_titles_and_labelled_axes(saved, tmp_path, capsys):
    from neuronmm_fx import bench
    from neuronmm_fx.checkpoint import read_report
    from neuronmm_fx.plots import plot_latency, plot_ranks

    assert main(["inspect", str(saved / "out"), "--plot", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report, _ = read_report(saved / "out")
    figure = plot_ranks(report, tmp_path / "again.png")
    for axes in figure.axes:
        assert axes.get_title() and axes.get_xlabel() and axes.get_ylabel()
    heights = sorted({round(p.get_height()) for p in figure.axes[0].patches})
    assert heights == [32]  # every matrix at its rank
    runs = {"a": [(0.010, 0.002), (0.012, 0.003)], "b": [(0.020, 0.004), (0.018, 0.004)]}
    figure = plot_latency(bench.summarize(runs, "a"), tmp_path / "latency.png", title="t")
    assert [axes.get_ylabel() for axes in figure.axes] == ["prefill (ms)", "decode (ms/token)"]
    assert all(axes.get_title().startswith("t: ") and axes.get_xlabel() == "variant" for axes in figure.axes)
    assert [round(p.get_height(), 3) for p in figure.axes[0].patches] == [11.0, 19.0]  # medians, ms
    capsys.readouterr()
    bad = ["inspect", str(saved / "out"), "--plot", str(tmp_path / "ranks.jpg")]
    with pytest.raises(SystemExit) as exit_info:
        main(bad)
    assert exit_info.value.code == 2 and "must be a .png file" in capsys.readouterr().err


def test_the_traffic_plot_draws_every_variant_per_shape_and_target(tmp_path):
    from neuronmm_fx.plots import plot_traffic

    def row(key, target, tokens):
        variants = {
            v: {"hbm": (11 + i) * 1e6 * tokens, "time": (i + 1) * 1e-6 * tokens} for i, v in enumerate("ab")
        }
        variants["c"] = (
            None if tokens == 1 else {"hbm": 20e6 * tokens, "time": 5e-6 * tokens}
        )  # c did not fit
        return {"key": key, "target": target, "M": tokens, "bound": 10e6 * tokens, "variants": variants}

    rows = [row(key, target, m) for key in ("A", "B") for target in ("trn2", "trn3") for m in (1, 128, 512)]
    figure = plot_traffic(rows, tmp_path / "traffic.png")
    assert len(figure.axes) == 4  # two shapes on trn2 (the first target), traffic and time each
    assert [axes.get_title() for axes in figure.axes] == [
        f"{key} on trn2: {what}" for key in "AB" for what in ("HBM traffic", "modelled time")
    ]
    traffic, time = figure.axes[0], figure.axes[1]
    assert traffic.get_ylabel() == "HBM traffic (MB)" and time.get_ylabel() == "modelled time (µs)"
    assert [line.get_label() for line in traffic.get_lines()] == ["a", "b", "c", "bound"]
    assert list(traffic.get_lines()[2].get_xdata()) == [128, 512]  # no point where c did not fit
    assert list(traffic.get_lines()[3].get_ydata()) == [10.0, 1280.0, 5120.0]  # the bound, MB
    assert list(time.get_lines()[1].get_ydata()) == [2.0, 256.0, 1024.0]  # µs


def test_lm_eval_and_the_project_evaluator_agree_on_the_shipped_task(saved, capfd):
    from neuronmm_fx import from_pretrained
    from neuronmm_fx.evaluate import rolling_loglikelihood
    from neuronmm_fx.harness import TEXT_TASK, run_lm_eval, summed_loglikelihood

    model, tokenizer = from_pretrained(saved / "out"), word_tokenizer()
    text = (saved / "text.txt").read_text()
    results = run_lm_eval(model, tokenizer, [TEXT_TASK], text=saved / "text.txt", max_length=64)
    theirs = summed_loglikelihood(results, text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    ours = rolling_loglikelihood(model, ids, max_length=64, prefix_token=tokenizer.eos_token_id)
    assert abs(ours - theirs) <= 0.005 * abs(theirs)  # summed token log-likelihood within 0.5 %
    assert ours < -len(WORDS)  # a real sum over 600 tokens, not a placeholder

    capfd.readouterr()
    args = ["eval", str(saved / "out"), "--text", str(saved / "text.txt"), "--seq-len", "64"]
    assert main([*args, "--tasks", TEXT_TASK, "--json", "--quiet"]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""  # --quiet: no bar, log line or subprocess message on stderr at all
    figures = json.loads(captured.out)
    metrics = figures["lm_eval"][TEXT_TASK]
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= set(metrics)
    assert metrics["word_perplexity,none"] == pytest.approx(results[TEXT_TASK]["word_perplexity,none"])


def test_the_quality_plot_draws_perplexity_over_dense_against_parameters_removed(tmp_path):
    from neuronmm_fx.plots import plot_quality

    rows = [{"name": "dense", "ratio": "-", "mlp_kept": 1.0, "wiki": (10.0, 0, 1, 9), "code": (5.0, 0, 1, 9)}]
    for ratio, factor in ((0.1, 1.5), (0.2, 2.0)):
        rows.append(
            {
                "name": "default",
                "ratio": ratio,
                "mlp_kept": 1 - ratio,
                "wiki": (10 * factor, 0.1, 0.9, 9),
                "code": (5 * factor, 0.1, 0.9, 9),
            }
        )
    figure = plot_quality(rows, tmp_path / "quality.png")
    assert [axes.get_title() for axes in figure.axes] == [
        "wiki (dense perplexity 10.00)",
        "code (dense perplexity 5.00)",
    ]
    for axes in figure.axes:
        assert axes.get_xlabel() == "share of MLP parameters removed"
        assert axes.get_ylabel() == "perplexity × dense"
        default = axes.get_lines()[0]
        assert default.get_label() == "default" and list(default.get_ydata()) == [1.5, 2.0]
        assert [round(x, 6) for x in default.get_xdata()] == [0.1, 0.2]
