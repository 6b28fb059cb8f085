"""The command line on tiny models: outputs, JSON, one-line errors, no partial output."""

import json
import subprocess
import sys

import pytest

import bricks

from .conftest import one_line_error, run



def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("info", "analyze", "partition"):
        assert cmd in r.output


def test_info_json(tiny_dirs):
    r = run("info", tiny_dirs["phi3"], "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["model_type"] == "phi3" and data["ffn"]["gated"] and data["d_ff"] == 64


def test_analyze_tiny(llama_dir, tmp_path):
    out = tmp_path / "a"
    r = run("analyze", llama_dir, "--data", "code=builtin:code", "--data", "math=builtin:math", "--out", out,
            "--windows", 6, "--eval-windows", 2, "--seq-len", 32, "--calib-tokens", 64, "--ppl-increase", 5, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert json.loads(r.stdout)["sparsity"]["cett"] == report["sparsity"]["cett"]
    assert len(report["sparsity"]["activation_ratio"]) == 2
    assert set(report["specialization"]["per_domain"]) == {"code", "math"}
    assert len(report["ablation"]["relative_change"]) == 2
    import matplotlib.image

    for png in ("sparsity", "specialization", "ablation", "modularity"):
        image = matplotlib.image.imread(out / f"{png}.png")  # a PNG that decodes, with something drawn on it
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image[..., :3].std() > 0.05, png
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_plotting_leaves_the_callers_backend_alone():
    """A notebook that calls bricks.analyze keeps its inline plots: the plot modules never pick a backend."""
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import bricks.analysis.plots, bricks.fusion.plots; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


def test_partition_cli(llama_dir, tmp_path):
    out = tmp_path / "bs"
    r = run("partition", llama_dir, "--method", "coactivation", "--bricks", 4, "--shared", 0.125,
            "--data", "code=builtin:code", "--windows", 4, "--seq-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    bs = bricks.BrickSet.load(out)
    assert bs.n_bricks(0) == 5 and bs.shared[0] == 4
    assert json.loads(r.stdout)["bricks_per_layer"] == 5


@pytest.mark.parametrize("args, message", [
    (["partition", "{model}", "--method", "metis", "--bricks", 4, "--out", "{out}"], "unknown partition method"),
    (["partition", "{model}", "--method", "coactivation", "--bricks", 4, "--out", "{out}"], "needs activation data"),
    (["partition", "{bert}", "--method", "random", "--bricks", 4, "--out", "{out}"], "unsupported architecture"),
    (["analyze", "{model}", "--data", "x={empty}", "--out", "{out}"], "contains no text"),
    (["analyze", "{model}", "--data", "x=builtin:code", "--out", "{out}", "--ppl-increase", -1], "invalid options"),
    (["analyze", "/no/such/model", "--data", "x=builtin:code", "--out", "{out}"], "not found on disk"),
    (["info", "{broken}"], "cannot load the weights"),
])
def test_bad_input_one_line_no_output(llama_dir, tmp_path, args, message):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(bert)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:200] if f.name.endswith(".safetensors") else f.read_bytes())
    out = tmp_path / "out"
    fill = dict(model=llama_dir, bert=bert, empty=empty, out=out, broken=broken)
    line = one_line_error(run(*[str(a).format(**fill) for a in args]))
    assert message in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_brickset_from_other_model_refused(tiny_dirs, tmp_path):
    from bricks.routing import assemble_bricked

    assert run("partition", tiny_dirs["llama"], "--method", "random", "--bricks", 4, "--out", tmp_path / "bs").exit_code == 0
    other, _ = bricks.load_model(tiny_dirs["qwen2"])
    with pytest.raises(bricks.BricksError, match="not from this model"):
        assemble_bricked(other, bricks.BrickSet.load(tmp_path / "bs"))


def test_console_script_exit_code(tmp_path):
    """The installed `bricks` entry point exits non-zero with one line on stderr."""
    r = subprocess.run([sys.executable, "-m", "bricks.cli", "partition", "nowhere", "--method", "random",
                        "--bricks", "2", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "not found on disk" in r.stderr


def test_verify(tiny_dirs, tmp_path):
    bs_dir = tmp_path / "bs"
    assert run("partition", tiny_dirs["llama"], "--method", "param-kmeans", "--bricks", 4, "--out", bs_dir).exit_code == 0
    r = run("verify", tiny_dirs["llama"], bs_dir, "--seq-len", 16, "--json")
    assert r.exit_code == 0, r.output
    err = json.loads(r.stdout)["max_abs_logit_difference"]
    assert err["reassembled"] == 0.0 and err["brickwise"] <= 1e-5
    line = one_line_error(run("verify", tiny_dirs["mistral"], bs_dir))
    assert "not from this model" in line


def test_missing_weights(llama_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    for f in llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
    assert "cannot load the weights" in one_line_error(run("info", d))


def test_analyze_config_file(llama_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("windows: 6\nwindow_size: 32\n")
    out = tmp_path / "o"
    line = one_line_error(run("analyze", llama_dir, "--data", "code=builtin:code", "--out", out, "--config", bad))
    assert "window_size" in line and "unknown key" in line and not out.exists()
    good = tmp_path / "good.yaml"
    good.write_text("windows: 4\neval_windows: 1\nseq_len: 32\ncalib_tokens: 64\nppl_increase: 5\n")
    r = run("analyze", llama_dir, "--data", "code=builtin:code", "--out", out, "--config", good, "--windows", 5)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "report.json").read_text())["config"]
    assert cfg["windows"] == 5 and cfg["seq_len"] == 32  # the flag wins over the file


def test_eval_explains_a_routed_models_bad_looking_figures():
    from bricks.cli.routing import _explain

    slow_and_worse = {"model_eval": {"compute_fraction": 0.5}, "ratio": {"tokens_per_s": 0.53, "ppl": {"code": 1.46}},
                      "recovered": False}
    lines = _explain(slow_and_worse, 8)
    assert len(lines) == 2 and "one-token decoding" in lines[0] and "before training" in lines[1]
    fine = {"model_eval": {"compute_fraction": 0.5}, "ratio": {"tokens_per_s": 1.3, "ppl": {"code": 1.05}}}
    assert _explain(fine, 8) == [] and _explain({**slow_and_worse, "model_eval": {"compute_fraction": 1.0}}, 8) == []
