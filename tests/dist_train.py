"""Helper run by test_distributed: CPET training (the shared training loop) in one or two processes; rank 0 saves
the trained bricks."""

import sys

import torch
from safetensors.torch import save_file

import bricks
from bricks.compress import CompressConfig, attach_cpet, compress, train_cpet
from bricks.runtime import init_distributed, world

init_distributed()
model_dir, out = sys.argv[1], sys.argv[2]
teacher, tok = bricks.load_model(model_dir)
windows = torch.randint(0, 300, (12, 16), generator=torch.Generator().manual_seed(0))
lora, _ = bricks.train_lora(teacher, windows, "t", rank=2, steps=1)
student, _ = compress(bricks.load_model(model_dir)[0], tok, CompressConfig(methods=["magnitude"], sparsity=0.5))
parts = attach_cpet(student, lora, recovery_rank=2)
lora.merge_into(teacher)
report = train_cpet(parts, teacher, windows, steps=3, batch_size=4, lr=1e-2)
rank, size = world()
if rank == 0:
    state = {k: v.detach().contiguous() for k, v in parts.state_dict().items()}
    save_file({**state, "world": torch.tensor([float(size)]), "loss_last": torch.tensor([report["loss_last"]])}, out)
