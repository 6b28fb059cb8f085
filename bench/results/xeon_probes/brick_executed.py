"""The executed fraction of the tests' small bricked FFN (66x200 in 9 bricks at 0.4) on the kernel path, bf16, at 1, 5
and 33 tokens. Run from the repository root, with and without BRICKS_CPU_AMX=0."""
import torch
from bricks.routing import BrickedFFN, cpu_kernels
from bricks.routing.bench import random_ffn_model
from bricks.arch import ffns
torch.manual_seed(0)
f = ffns(random_ffn_model(66, 200, torch.bfloat16))[0]
ffn = BrickedFFN(f, torch.arange(200)[torch.randperm(200)] % 9, None, router="centroid", active=0.4)
ffn.set_path("kernel")
for tokens in (1, 5, 33):
    ffn.reset_counts()
    with torch.no_grad():
        ffn(torch.randn(tokens, 66).bfloat16())
    print(cpu_kernels.isa(), tokens, round(ffn.routed_fraction(), 3), round(ffn.executed_fraction(), 3))
