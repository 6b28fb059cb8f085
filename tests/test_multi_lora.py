"""Many adapter bricks on one base: mixed batches equal each adapter alone."""

import pytest
import torch
from peft import PeftModel

import bricks
from bricks.adapters import AdapterBrick
from bricks.adapters import attach_adapters

from .test_adapters import make_adapter


@pytest.fixture
def three(llama_dir, tmp_path):
    dirs = [make_adapter(llama_dir, tmp_path / "a", seed=1),
            make_adapter(llama_dir, tmp_path / "b", seed=2, r=2, lora_alpha=4),
            make_adapter(llama_dir, tmp_path / "c", seed=3, r=8, target_modules=["q_proj", "o_proj"], use_rslora=True)]
    return dirs, [AdapterBrick.from_peft(d) for d in dirs]


def test_mixed_batch_equals_each_adapter_alone(llama_dir, three):
    dirs, brs = three
    ids = torch.randint(0, 300, (6, 9))
    which = torch.tensor([0, 2, 1, -1, 2, 0])  # -1: the base alone
    alone = []
    for d in dirs:
        base, _ = bricks.load_model(llama_dir)
        with torch.no_grad():
            alone.append(PeftModel.from_pretrained(base, d)(ids).logits)
    base, _ = bricks.load_model(llama_dir)
    with torch.no_grad():
        plain = base(ids).logits
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    with torch.no_grad():
        with multi.use(ids=which):
            mixed = model(ids).logits
        assert torch.equal(model(ids).logits, plain)  # outside `use`: the base
    for row, k in enumerate(which.tolist()):
        ref = plain[row] if k < 0 else alone[k][row]
        assert (mixed[row] - ref).abs().max() <= 1e-5, (row, k)
    # A weighted mix per sequence: base + sum_k w_k ΔW_k.
    w = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]])
    with torch.no_grad(), multi.use(weights=w):
        mix = model(ids[:2]).logits
    for row in range(2):
        ref_model, _ = bricks.load_model(llama_dir)
        for k, br in enumerate(brs):
            if w[row, k]:
                br.merge_into(ref_model, float(w[row, k]))
        with torch.no_grad():
            assert (ref_model(ids[row : row + 1]).logits[0] - mix[row]).abs().max() <= 1e-5
    multi.detach()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)  # detached: the base again


def test_generate_per_sequence_adapters(llama_dir, three):
    dirs, brs = three
    prompt = torch.randint(0, 300, (3, 5))
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    with multi.use(ids=[2, 0, 1]):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, k in enumerate([2, 0, 1]):
        base, _ = bricks.load_model(llama_dir)
        alone = PeftModel.from_pretrained(base, dirs[k]).generate(input_ids=prompt[row : row + 1], max_new_tokens=6,
                                                                  do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], alone[0])
    with pytest.raises(bricks.BricksError, match="ids must be"):
        with multi.use(ids=[5, 0, 0]):
            pass
    with pytest.raises(bricks.BricksError, match="either ids"):
        with multi.use():
            pass


def test_grouped_batch_checks_its_batch_size(llama_dir, three):
    _, brs = three
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    with multi.use(ids=[0, 1]), pytest.raises(bricks.BricksError, match="for 2 sequences, the batch has 3"):
        model(torch.randint(0, 300, (3, 5)))
