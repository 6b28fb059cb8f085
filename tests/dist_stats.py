"""Helper run by test_distributed under `accelerate launch`: capture statistics, rank 0 saves them."""

import sys

import torch
from safetensors.torch import save_file

import bricks
from bricks.analysis.capture import capture_stats
from bricks.runtime import init_distributed, world
from bricks.analysis.sparsity import perplexity

init_distributed()
model_dir, out = sys.argv[1], sys.argv[2]
model, tok = bricks.load_model(model_dir)
domains = bricks.load_domains(["code=builtin:code", "math=builtin:math"], tok, seq_len=16, max_windows=5)
stats = capture_stats(model, domains, batch_size=2, thresholds=torch.tensor([0.05, 0.05]), coactivation_stride=1)
ppl = perplexity(model, torch.cat([d.windows for d in domains]), batch_size=2)
rank, size = world()
if rank == 0:
    save_file({"active": stats.active.float(), "sample_mean": stats.sample_mean, "coact": stats.coact,
               "tokens": stats.tokens.float(), "ppl": torch.tensor([ppl]), "world": torch.tensor([float(size)])}, out)
