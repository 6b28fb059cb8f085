"""MoE assembly from dense models: the FFNs of several checkpoints become the experts of a Mixtral checkpoint.

Attention, norms and embeddings come from the base model; layer i's FFN of
expert model k becomes expert k of layer i; a router ("gate") per layer picks
`experts_per_token` experts per token. The output is a standard Mixtral
checkpoint (`MixtralForCausalLM`, expert tensors named `block_sparse_moe.
experts.{k}.w1/w2/w3` as Mixtral's own checkpoints are), so plain transformers
loads it without this package.

The config is mergekit-moe's YAML (users bring theirs):

    base_model: runs/smollm2
    gate_mode: hidden            # hidden | cheap_embed | random
    experts_per_token: 2
    dtype: float32
    experts:
      - source_model: runs/code-tuned
        positive_prompts: ["def main():", "import numpy as np"]
      - source_model: runs/math-tuned
        positive_prompts: ["Solve for x:"]
        negative_prompts: ["def"]
        positive_data: builtin:math    # bricks extension: sample windows of a data source as prompts

Gate rows start from hidden states, as in mergekit's `hidden` mode, but from
the FFN's own input (the hidden state after the post-attention norm, which is
what a Mixtral router multiplies): per layer, the mean input over each
expert's prompts, minus the mean over all experts' prompts (or, when given,
minus the mean over its negative prompts), as a unit direction scaled so that
a typical token's logits span a few units. `cheap_embed` uses token
embeddings instead (the same rows in every layer); `random` seeded random rows.
`train_gates` then trains the router weights alone with the language-model
loss (plus Mixtral's load-balancing loss) on example text.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..data import windows
from ..errors import BricksError
from ..io import atomic_dir, check_output, read_yaml, validated
from ..loading import load_dense, resolve
from ..training import train_lm, trainable
from .safetensors_io import Checkpoint, ShardedWriter, copy_side_files

MOE_ARCHITECTURES = ("llama", "mistral")  # gate/up/down SwiGLU FFNs, no attention biases: what Mixtral can hold
_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
LOGIT_SCALE = 8.0  # a unit gate direction is scaled so that a token of typical norm gets logits of up to this size


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] = []
    negative_prompts: list[str] = []
    positive_data: str | None = None  # bricks extension: a data source (builtin:code, a file, a dataset dir)


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: list[Expert]
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    experts_per_token: int = 2
    dtype: str | None = None
    tokenizer_source: str | None = None
    architecture: Literal["mixtral"] = "mixtral"

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {v!r}: choose float32, float16 or bfloat16")
        return v


_NOT_SUPPORTED = {"shared_experts": "shared experts (Qwen2-MoE output)", "residual_scale": "residual scaling of experts"}


def load_moe_config(path: str | Path) -> MoEConfig:
    raw = read_yaml(path, "MoE", {k: f"({what}) is not supported; bricks writes Mixtral checkpoints"
                                  for k, what in _NOT_SUPPORTED.items()})
    cfg = validated(MoEConfig, raw, path)
    if len(cfg.experts) < 2:
        raise BricksError(f"{path}: an MoE needs at least 2 experts, the config lists {len(cfg.experts)}")
    if not 1 <= cfg.experts_per_token <= len(cfg.experts):
        raise BricksError(f"{path}: experts_per_token must be in [1, {len(cfg.experts)}], got {cfg.experts_per_token}")
    if cfg.gate_mode != "random":
        empty = [e.source_model for e in cfg.experts if not (e.positive_prompts or e.positive_data)]
        if empty:
            raise BricksError(f"{path}: gate_mode {cfg.gate_mode} needs positive_prompts (or positive_data) for every "
                              f"expert; {empty[0]} has none")
    return cfg


def _check_inputs(base: Checkpoint, base_cfg: dict, experts: list[Checkpoint]) -> int:
    """Refuse what a Mixtral checkpoint cannot hold; the number of layers."""
    kind = base_cfg.get("model_type")
    if kind not in MOE_ARCHITECTURES:
        raise BricksError(f"{base.path} is a {kind} model; MoE assembly writes Mixtral checkpoints and supports "
                          f"{', '.join(MOE_ARCHITECTURES)} (SwiGLU FFNs, no attention biases)")
    if base_cfg.get("attention_bias") or base_cfg.get("mlp_bias"):
        raise BricksError(f"{base.path} has attention or FFN biases, which Mixtral has no place for")
    ffn = [n for n in base.names() if _FFN.match(n)]
    other_mlp = [n for n in base.names() if ".mlp." in n and not _FFN.match(n)]
    if other_mlp:
        raise BricksError(f"{base.path} has {other_mlp[0]}, which a Mixtral expert has no place for")
    n_layers = base_cfg["num_hidden_layers"]
    if len(ffn) != 3 * n_layers:
        raise BricksError(f"{base.path}: found {len(ffn)} FFN weights for {n_layers} layers (expected 3 per layer)")
    for e in experts:
        with open(e.path / "config.json") as f:
            kind_e = json.load(f).get("model_type")
        if kind_e != kind:
            raise BricksError(f"expert {e.path} is a {kind_e} model, the base a {kind} model: experts must share the "
                              "base's architecture")
        for n in ffn:
            if n not in e.entries:
                raise BricksError(f"expert {e.path} lacks {n}: experts must share the base's architecture")
            if e.shape(n) != base.shape(n):
                raise BricksError(f"expert {e.path}: {n} is {e.shape(n)}, the base has {base.shape(n)}: shape mismatch")
    return n_layers


def mixtral_config(base_cfg: dict, n_experts: int, top_k: int, dtype: str | None) -> dict:
    """A Mixtral config.json with the base's dimensions."""
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "attention_dropout", "bos_token_id",
            "eos_token_id", "pad_token_id", "tie_word_embeddings", "sliding_window")
    cfg = {k: base_cfg[k] for k in keep if k in base_cfg}
    cfg.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": n_experts,
                "num_experts_per_tok": top_k, "output_router_logits": False, "router_aux_loss_coef": 0.01,
                "use_cache": True})
    if dtype or base_cfg.get("torch_dtype") or base_cfg.get("dtype"):
        cfg["torch_dtype"] = cfg["dtype"] = dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    return cfg


def _prompt_ids(tokenizer, expert: Expert, negative: bool, max_windows: int = 16, seq_len: int = 128) -> list[torch.Tensor]:
    texts = expert.negative_prompts if negative else expert.positive_prompts
    ids = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts if t.strip()]
    if not negative and expert.positive_data:
        w = windows(tokenizer, expert.positive_data, "train", seq_len, max_windows)
        ids += [w[i : i + 8] for i in range(0, len(w), 8)]
    return ids


@torch.no_grad()
def gate_weights(config: MoEConfig, base_dir: Path, n_layers: int, seed: int = 0) -> torch.Tensor:
    """Initial router rows [n_layers, n_experts, hidden] for the config's gate mode."""
    from ..arch import ffns

    n = len(config.experts)
    if config.gate_mode == "random":
        with open(base_dir / "config.json") as f:
            d = json.load(f)["hidden_size"]
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n_layers, n, d, generator=g) / math.sqrt(d)
    model, tok = load_dense(str(base_dir))
    layers = [f.module for f in ffns(model)]
    d = model.get_input_embeddings().weight.shape[1]

    def mean_inputs(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Mean FFN input per layer over the prompts' tokens [L, d], and the inputs' mean norm."""
        if not prompts:
            return None, 0.0
        total, norm, count = torch.zeros(n_layers, d, dtype=torch.float64), 0.0, 0

        def grab(module, args, i):
            nonlocal norm
            x = args[0].detach().double().reshape(-1, d)
            total[i] += x.sum(0)
            norm += x.norm(dim=-1).sum().item() / n_layers
        if config.gate_mode == "cheap_embed":
            for ids in prompts:
                e = model.get_input_embeddings()(ids).double().reshape(-1, d)
                total += e.sum(0)
                norm += e.norm(dim=-1).sum().item()
                count += e.shape[0]
            return total / count, norm / count
        hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: grab(mod, a, i)) for i, m in enumerate(layers)]
        try:
            for ids in prompts:
                model(input_ids=ids, use_cache=False)
                count += ids.numel()
        finally:
            for h in hooks:
                h.remove()
        return total / count, norm / count

    pos = [mean_inputs(_prompt_ids(tok, e, False)) for e in config.experts]
    neg = [mean_inputs(_prompt_ids(tok, e, True)) for e in config.experts]
    center = torch.stack([p for p, _ in pos]).mean(0)
    typical = sum(s for _, s in pos) / n
    rows = []
    for (p, _), (q, _) in zip(pos, neg):
        direction = p - (q if q is not None else center)
        rows.append(torch.nn.functional.normalize(direction, dim=-1) * (LOGIT_SCALE / max(typical, 1e-6)))
    return torch.stack(rows, dim=1).float()  # [L, n, d]


def write_mixtral(config: MoEConfig, gates: torch.Tensor, out: Path, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Stream the base's shared tensors, every expert's FFN tensors and the gates into a Mixtral checkpoint in `out`."""
    base_dir = resolve(config.base_model)
    base = Checkpoint(base_dir)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    experts = [Checkpoint(resolve(e.source_model)) for e in config.experts]
    n_layers = _check_inputs(base, base_cfg, experts)
    out_dtype = getattr(torch, config.dtype) if config.dtype else None

    def cast(dtype):
        return out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype

    plan, sources = [], []  # (name, shape, dtype) and how to make each tensor
    for name in base.names():
        m = _FFN.match(name)
        if m is None:
            plan.append((name, base.shape(name), cast(base.dtype(name))))
            sources.append((base, name))
            continue
        layer, part = int(m.group(1)), m.group(2)
        if part == "gate_proj":  # the router goes once per layer, before its experts
            gname = f"model.layers.{layer}.block_sparse_moe.gate.weight"
            plan.append((gname, tuple(gates.shape[1:]), cast(base.dtype(name))))
            sources.append((None, layer))
        for k, e in enumerate(experts):
            plan.append((f"model.layers.{layer}.block_sparse_moe.experts.{k}.{_MIXTRAL_NAMES[part]}.weight",
                         e.shape(name), cast(e.dtype(name))))
            sources.append((e, name))
    writer = ShardedWriter(out, plan, max_shard_bytes)
    try:
        for (name, _, dtype), (src, key) in zip(plan, sources):
            t = gates[key] if src is None else src.get(key)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BricksError(f"{src.path if src else 'gate'}: {key} holds NaN or infinite values")
            writer.write(name, t.to(dtype))
    finally:
        writer.close()
    tok_dir = base_dir if config.tokenizer_source in (None, "base") else resolve(config.tokenizer_source)
    copy_side_files(tok_dir, base_dir, out, out_dtype)
    (out / "config.json").write_text(json.dumps(
        mixtral_config(base_cfg, len(experts), config.experts_per_token, config.dtype), indent=2))
    return {"layers": n_layers, "experts": len(experts), "tensors": len(plan), "shards": len(writer.files)}


def train_gates(moe_dir: Path, domains, steps: int = 50, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                log=None) -> tuple[torch.Tensor, dict]:
    """Train only the router weights of the Mixtral checkpoint in `moe_dir`: [L, n, d] and a report."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    gates = [p for n, p in model.named_parameters() if re.search(r"\.(mlp|block_sparse_moe)\.gate\.weight$", n)]
    if not gates:
        raise BricksError(f"{moe_dir} has no router weights to train")
    ids = torch.cat([d.windows for d in domains]) if domains else torch.empty(0, 0, dtype=torch.long)
    if ids.numel() == 0:
        raise BricksError("no training windows for the gates: give data with at least one window of tokens")
    with trainable(model, gates):
        model.train()
        # Mixtral adds its load-balancing loss to the LM loss when asked for the router logits.
        report = train_lm(model, ids, torch.optim.Adam(gates, lr=lr), steps, batch_size, seed, "gates", log,
                          output_router_logits=True)
    return torch.stack([p.detach().float() for p in gates]), report


def assemble_moe(config_path: str | Path, out: str | Path, train_domains=None, train_steps: int = 0, lr: float = 1e-3,
                 seed: int = 0, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, log=None) -> dict:
    """`bricks moe CONFIG.yaml --out DIR`: validate, compute gates, write the Mixtral checkpoint (atomically)."""
    out = check_output(out, overwrite)
    config = load_moe_config(config_path)
    base_dir = resolve(config.base_model)
    with open(base_dir / "config.json") as f:
        n_layers = json.load(f)["num_hidden_layers"]
    gates = gate_weights(config, base_dir, n_layers, seed)
    report = {"gate_mode": config.gate_mode}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report.update(write_mixtral(config, gates, tmp, max_shard_bytes))
        if train_steps > 0:
            gates, report["gate_training"] = train_gates(tmp, train_domains or [], train_steps, lr, seed=seed, log=log)
            for f in tmp.iterdir():  # rewrite with the trained gates; every other tensor streams again
                f.unlink() if f.is_file() else shutil.rmtree(f)
            write_mixtral(config, gates, tmp, max_shard_bytes)
    report["out"] = str(out)
    return report
