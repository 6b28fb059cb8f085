"""Written with bricks at commit 3474ee8 (before the restructure): files the restructured package must still open."""
import sys
import torch
sys.path.insert(0, "/work/main/tests")
from pathlib import Path
from conftest import tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
import bricks

out = Path(sys.argv[1]); out.mkdir(parents=True)
tok = tiny_tokenizer()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_config("llama"))
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
base = out / "base"; model.save_pretrained(base); tok.save_pretrained(base)
m, _ = bricks.load_model(base)
bs = bricks.partition(m, "param-kmeans", 4, None, seed=0, info={"model": "tiny-llama"})
bs.save(out / "brickset")
ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
expected = {"ids": ids}
bricks.moefy(m, bs, router="centroid", active=0.5)
bricks.save_configured(m, tok, out / "moe-centroid")
with torch.no_grad():
    expected["moe_centroid"] = m(ids).logits
m, _ = bricks.load_model(base)
bricks.moefy(m, None, router="teal", compute=0.5)
bricks.save_configured(m, tok, out / "moe-teal")
with torch.no_grad():
    expected["moe_teal"] = m(ids).logits
from peft import LoraConfig, get_peft_model
m, _ = bricks.load_model(base)
torch.manual_seed(0)
pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
pm.save_pretrained(out / "peft")
from bricks.adapters import AdapterBrick
b = AdapterBrick.from_peft(out / "peft", name="legacy")
b.save(out / "adapter")
for k, v in b.deltas().items():
    expected[f"delta.{k}"] = v
save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
import shutil; shutil.rmtree(out / "peft"); shutil.rmtree(base)
print("ok")
