"""Every family of the architecture table, on a tiny random model."""

import pytest
import torch

import bricks
from bricks.arch import ffns
from bricks.routing import BrickedFFN

from .conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_axis_matches_the_model(tiny_dirs, family):
    """Hooked activations times the down projection give the FFN's own output."""
    model, tok = bricks.load_model(tiny_dirs[family])
    assert set(bricks.supported_model_types()) >= set(FAMILIES)
    blocks = ffns(model)
    assert len(blocks) == 2 and blocks[0].d_ff == 64
    seen = {}
    with bricks.ffn_hooks(model, lambda i, a: seen.__setitem__(i, a.detach().clone())):
        model(torch.randint(0, 300, (2, 9)))
    for f in blocks:
        a = seen[f.layer]  # [batch, pos, d_ff]
        assert a.shape == (2, 9, 64)
        # Recompute the activation from the table's view of the weights.
        x = torch.randn(3, f.down_weight().shape[0])
        h = x @ f.up_weight().t() + (f.up_bias() if f.up_bias() is not None else 0)
        if f.gate_weight() is not None:
            g = x @ f.gate_weight().t() + (f.gate_bias() if f.gate_bias() is not None else 0)
            h = f.act(g) * h
        else:
            h = f.act(h)
        y = h @ f.down_weight().t() + (f.down_bias() if f.down_bias() is not None else 0)
        if f.layout.mlp:
            torch.testing.assert_close(y, f.module(x), rtol=1e-5, atol=1e-6)
        # A brick-wise FFN over a random partition computes the same function.
        bricked = BrickedFFN(f, torch.randint(0, 5, (64,)).sort().values.roll(3))
        torch.testing.assert_close(bricked(x), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_info(tiny_dirs, family):
    model, _ = bricks.load_model(tiny_dirs[family])
    info = bricks.model_info(model)
    assert info["model_type"] == family and info["layers"] == 2 and info["d_ff"] == 64
    assert 0 < info["parameters"]["ffn"] < info["parameters"]["total"]


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(bricks.BricksError, match="unsupported architecture 'bert'.*llama"):
        bricks.load_model(tmp_path)
