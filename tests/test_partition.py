"""Partitions are exact covers, BrickSets round-trip, bricked FFNs equal the dense model."""

import json

import pytest
import torch

import bricks
from bricks.analysis.partition import PARTITIONERS, activation_statistics, balanced_kernel_kmeans
from bricks.routing import assemble_bricked


@pytest.fixture(scope="module")
def stats(llama):
    model, tok = llama
    return activation_statistics(model, tok, ["code=builtin:code", "math=builtin:math"], windows=6, seq_len=32)


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
@pytest.mark.parametrize("shared", [0.0, 0.125])
def test_exact_cover_balanced(llama, stats, method, shared):
    model, _ = llama
    bs = bricks.partition(model, method, 6, stats, shared_fraction=shared, seed=1)
    for layer in range(bs.n_layers):
        neurons = torch.cat([b.neurons for b in bs.bricks(layer)])
        assert sorted(neurons.tolist()) == list(range(64))  # every neuron exactly once
        routed = [b.size for b in bs.bricks(layer) if not b.shared]
        assert len(routed) == 6 and max(routed) - min(routed) <= 1
        if shared:
            (sh,) = [b for b in bs.bricks(layer) if b.shared]
            assert sh.size == 8
            freq = stats.activation_frequency()[layer]
            assert freq[sh.neurons].min() >= freq.median()  # the most frequently active ones


def test_methods_differ_from_random(llama, stats):
    model, _ = llama
    parts = {m: bricks.partition(model, m, 4, stats).assignments[0] for m in PARTITIONERS}
    for m in ("param-kmeans", "coactivation", "functional"):
        assert not torch.equal(parts[m], parts["random"])


def test_balanced_kernel_kmeans_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(40) % 4
    x = centers[labels] + 0.1 * torch.randn(40, 16, generator=g)
    found = balanced_kernel_kmeans(x @ x.t(), 4)
    for c in range(4):  # each planted cluster maps to exactly one found cluster
        assert len(set(found[labels == c].tolist())) == 1


def test_roundtrip_and_fingerprint(llama, stats, tmp_path, tiny_dirs):
    model, _ = llama
    bs = bricks.partition(model, "functional", 5, stats, shared_fraction=0.1, info={"model": "tiny-llama"})
    bs.save(tmp_path / "bs")
    back = bricks.BrickSet.load(tmp_path / "bs")
    assert back == bs
    assert json.loads((tmp_path / "bs" / "bricks.json").read_text())["fingerprint"] == bricks.model_fingerprint(model)
    with pytest.raises(bricks.BricksError, match="already exists"):
        bs.save(tmp_path / "bs")
    other, _ = bricks.load_model(tiny_dirs["mistral"])
    with pytest.raises(bricks.BricksError, match="made from tiny-llama"):
        back.check_model(other)
    # Same weights in another dtype are the same model.
    back.check_model(model.to(torch.bfloat16))
    model.float()


def test_corrupt_brickset(llama, tmp_path):
    model, _ = llama
    bricks.partition(model, "random", 4).save(tmp_path / "bs")
    (tmp_path / "bs" / "bricks.safetensors").write_bytes(b"garbage")
    with pytest.raises(bricks.BricksError, match="corrupt"):
        bricks.BrickSet.load(tmp_path / "bs")
    with pytest.raises(bricks.BricksError, match="not a BrickSet"):
        bricks.BrickSet.load(tmp_path)


def test_bad_partition_requests(llama):
    model, _ = llama
    with pytest.raises(bricks.BricksError, match="unknown partition method 'spectral'.*random"):
        bricks.partition(model, "spectral", 4)
    with pytest.raises(bricks.BricksError, match="needs activation data"):
        bricks.partition(model, "coactivation", 4)
    with pytest.raises(bricks.BricksError, match="between 1 and 64"):
        bricks.partition(model, "random", 65)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gpt_neox", "gemma"])
def test_all_bricks_reproduce_dense_logits(tiny_dirs, family):
    model, _ = bricks.load_model(tiny_dirs[family])
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        bs = bricks.partition(model, "param-kmeans", 7)
        with bricks.bricked(model, bs, brickwise=True):  # brick by brick: dense up to fp32 summation order
            brickwise = model(ids).logits
        assemble_bricked(model, bs)  # all bricks active: the dense FFN in its original neuron order, bit for bit
        full = model(ids).logits
    assert torch.equal(full, dense)
    assert 0 < (brickwise - dense).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_reassembled_bricks_are_the_dense_ffn(tiny_dirs, family):
    """Cut the FFN weights into bricks, clear them, write them back: the model is unchanged."""
    model, _ = bricks.load_model(tiny_dirs[family])
    bs = bricks.partition(model, "random", 5, seed=3)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        pieces = [bs.brick_weights(model, layer) for layer in range(bs.n_layers)]
        bs.reassemble(model, pieces)
        assert torch.equal(model(ids).logits, dense)
        pieces[1].pop(2)  # a brick missing: its neurons stay cleared
        bs.reassemble(model, pieces)
        assert (model(ids).logits - dense).abs().max() > 1e-4
