"""Adapter bricks: PEFT LoRA import/export round trips and merges, checked against PEFT itself."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bricks
from bricks.merge import AdapterBrick


def make_adapter(model_dir, out, seed=0, **lora):
    """A PEFT LoRA adapter on a tiny model, with random (non-zero) B so that it changes the outputs."""
    torch.manual_seed(seed)
    base, _ = bricks.load_model(model_dir)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], **lora})
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out)
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"v_proj": 2, "model.layers.1.mlp.up_proj": 6}, "alpha_pattern": {"down_proj": 3.0}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_export_round_trip_and_merge_match_peft(llama_dir, tmp_path, case):
    src = make_adapter(llama_dir, tmp_path / "peft", **CASES[case])
    brick = AdapterBrick.from_peft(src)
    if case == "patterns":
        ranks = {n: m.rank for n, m in brick.modules.items()}
        assert ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.1.mlp.up_proj"] == 6
        assert ranks["model.layers.0.mlp.up_proj"] == 4
        assert brick.modules["model.layers.0.mlp.down_proj"].scaling == pytest.approx(3.0 / 4)
    if case == "rslora":
        assert brick.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    brick.save(tmp_path / "brick")
    again = AdapterBrick.load(tmp_path / "brick")
    out = again.to_peft(tmp_path / "exported")
    ids = torch.randint(0, 300, (2, 12))

    base, _ = bricks.load_model(llama_dir)
    original = logits_of(PeftModel.from_pretrained(base, src), ids)
    base, _ = bricks.load_model(llama_dir)
    exported = logits_of(PeftModel.from_pretrained(base, out), ids)
    assert (original - exported).abs().max() <= 1e-6

    base, _ = bricks.load_model(llama_dir)
    merged_peft = PeftModel.from_pretrained(base, src).merge_and_unload()
    base, _ = bricks.load_model(llama_dir)
    again.merge_into(base)
    for (n, a), (_, b) in zip(merged_peft.state_dict().items(), base.state_dict().items()):
        assert (a - b).abs().max() <= 1e-5, n
    assert (logits_of(base, ids) - original).abs().max() <= 1e-5
    again.merge_into(base, weight=-1.0)  # detach
    plain, _ = bricks.load_model(llama_dir)
    assert (logits_of(base, ids) - logits_of(plain, ids)).abs().max() <= 1e-5


def test_conv1d_fan_in_fan_out(tiny_dirs, tmp_path):
    src = make_adapter(tiny_dirs["gpt2"], tmp_path / "peft", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    brick = AdapterBrick.from_peft(src)
    base, _ = bricks.load_model(tiny_dirs["gpt2"])
    merged = PeftModel.from_pretrained(base, src).merge_and_unload()
    base, _ = bricks.load_model(tiny_dirs["gpt2"])
    brick.merge_into(base)
    for (n, a), (_, b) in zip(merged.state_dict().items(), base.state_dict().items()):
        assert (a - b).abs().max() <= 1e-5, n


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "PEFT type 'IA3' is not supported"),
    ({"r": 7}, "rank 4 in its weights but 7"),
])
def test_unsupported_or_inconsistent_adapters_are_refused(llama_dir, tmp_path, change, message):
    src = make_adapter(llama_dir, tmp_path / "peft")
    _edit_config(src, **change)
    with pytest.raises(bricks.BricksError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdapterBrick.from_peft(src)


def test_bad_weights_are_refused(llama_dir, tiny_dirs, tmp_path):
    src = make_adapter(llama_dir, tmp_path / "peft")
    weights = src / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "lora_A" in k)
    nan = dict(state)
    nan[key] = torch.full_like(state[key], float("nan"))
    save_file(nan, str(weights))
    with pytest.raises(bricks.BricksError, match="NaN"):
        AdapterBrick.from_peft(src)
    bad = dict(state)
    bad[key] = state[key][:2]  # rank 2 against B's rank 4
    save_file(bad, str(weights))
    with pytest.raises(bricks.BricksError, match="ranks do not match|rank 2"):
        AdapterBrick.from_peft(src)
    weights.write_bytes(b"\x00" * 20)
    with pytest.raises(bricks.BricksError, match="corrupt"):
        AdapterBrick.from_peft(src)
    # An adapter for another base: a missing target module, or other shapes.
    good = AdapterBrick.from_peft(make_adapter(llama_dir, tmp_path / "peft2"))
    other, _ = bricks.load_model(tiny_dirs["gpt2"])
    with pytest.raises(bricks.BricksError, match="does not have"):
        good.merge_into(other)
