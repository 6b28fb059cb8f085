"""Activation capture: hooks that clean up, streaming statistics equal to brute force."""

import pytest
import torch
from sklearn.metrics import average_precision_score

import bricks
from bricks.analysis.capture import capture_stats, ffn_hooks
from bricks.analysis.sparsity import activation_sample, cett_curve, perplexity, threshold_hook
from bricks.analysis.specialization import average_precision, func_scores
from bricks.arch import ffns


def _hook_count(model):
    return sum(len(f.down._forward_pre_hooks) for f in ffns(model))


def test_hooks_removed_even_on_error(llama_dir):
    model, _ = bricks.load_model(llama_dir)
    with pytest.raises(RuntimeError):
        with ffn_hooks(model, lambda i, a: None):
            assert _hook_count(model) == 2
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_streaming_stats_equal_brute_force(llama_dir, tokenizer):
    model, _ = bricks.load_model(llama_dir)
    domains = bricks.load_domains(["code=builtin:code", "math=builtin:math"], tokenizer, seq_len=16, max_windows=6)
    thresholds = torch.tensor([0.05, 0.08])
    stats = capture_stats(model, domains, batch_size=4, thresholds=thresholds, coactivation_stride=1)
    ids = torch.cat([d.windows for d in domains])
    acts = {}
    with ffn_hooks(model, lambda i, a: acts.__setitem__(i, a.detach().abs())):
        model(ids)
    labels = torch.tensor([0] * 6 + [1] * 6)
    for i, f in enumerate(ffns(model)):
        a = acts[i]  # [12, 16, 64]
        active = (a * f.down_weight().norm(dim=0) >= thresholds[i]).float()
        torch.testing.assert_close(stats.activation_frequency()[i], active.mean((0, 1)))
        torch.testing.assert_close(stats.mean_abs()[i], a.mean((0, 1)))
        torch.testing.assert_close(stats.sample_mean[i], a.mean(1))
        torch.testing.assert_close(stats.domain_mean_abs()[i, 1], a[labels == 1].mean((0, 1)))
        b = active.reshape(-1, 64)
        torch.testing.assert_close(stats.coact[i], b.t() @ b)
    assert stats.n_tokens == 12 * 16


def test_average_precision_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 7, generator=g)
    labels = torch.rand(40, generator=g) < 0.3
    ours = average_precision(scores, labels)
    for j in range(7):
        assert ours[j].item() == pytest.approx(average_precision_score(labels.numpy(), scores[:, j].numpy()), abs=1e-6)
    # A neuron that fires only on the domain's samples scores 1.
    perfect = labels.float()[:, None] + 0.01 * torch.rand(40, 1, generator=g)
    assert average_precision(perfect, labels).item() == pytest.approx(1.0)
    fs = func_scores(scores[None].repeat(2, 1, 1), labels.long(), 2)
    assert fs.shape == (2, 2, 7)


def test_cett_curve_and_threshold_hook(llama_dir, tokenizer):
    model, _ = bricks.load_model(llama_dir)
    ids = bricks.windows(tokenizer, "builtin:prose", "train", seq_len=16, max_windows=8)
    calib = activation_sample(model, ids, max_tokens=64)
    assert calib[0].shape == (64, 64)
    f = ffns(model)[0]
    curve = cett_curve(calib[0], f.down_weight())
    assert curve.cett[0] == pytest.approx(0.0, abs=1e-6) and curve.ratio[0] == pytest.approx(1.0, abs=0.02)
    assert curve.ratio[-1] < 0.1 and curve.cett[-1] > 0.5
    eps = curve.eps_for(0.3)
    assert curve.eps[0] <= eps <= curve.eps[-1]
    # Zero thresholds leave the model unchanged; large ones change it.
    norms = [b.down_weight().norm(dim=0) for b in ffns(model)]
    dense = perplexity(model, ids)
    assert perplexity(model, ids, hook=threshold_hook(torch.zeros(2), norms)) == pytest.approx(dense, rel=1e-6)
    assert perplexity(model, ids, hook=threshold_hook(torch.full((2,), 1e3), norms)) != pytest.approx(dense, rel=1e-3)


def test_capture_on_a_dispatched_model(llama_dir, tokenizer, tmp_path):
    """Models dispatched by accelerate (device_map, here with a layer offloaded to disk and loaded back by
    accelerate's hooks at each forward pass) are captured like plain ones."""
    from transformers import AutoModelForCausalLM

    plain, _ = bricks.load_model(llama_dir)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(llama_dir, device_map=device_map, offload_folder=str(tmp_path))
    assert hasattr(dispatched.model.layers[1], "_hf_hook")  # really dispatched: weights come back per forward
    domains = bricks.load_domains(["prose=builtin:prose"], tokenizer, seq_len=16, max_windows=4)
    a = capture_stats(plain, domains, coactivation=False)
    b = capture_stats(dispatched, domains, coactivation=False)
    torch.testing.assert_close(a.sample_mean, b.sample_mean)
