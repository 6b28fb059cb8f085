"""Building a fused model from specs, and comparing it with what it fuses."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters.lora import AdapterBrick
from ..errors import BricksError
from ..loading import load_dense, split_spec
from ..runtime import batches, next_token_targets
from .model import AdapterSpecialists, FusedModel, ModelSpecialists, chat_templates


def fuse(specialists: list[str], base: str | None = None, names: list[str] | None = None, width: int = 512,
         device: str | None = None, dtype="float32"):
    """A fused model (untrained gate) and its tokenizer, from specialist specs.

    With `base`, every specialist is an adapter (brick or PEFT directory) on it; specs written `base+adapter`
    with one base for all are the same. Otherwise each spec is a model ("default", a directory, a .gguf file,
    or `base+adapter`, merged), run as a full model with its own KV cache. Adapter specialists on one base run
    as rows of one batch (the base weights read once per step).

    Example:
        >>> fused, tok = fuse(["runs/lora-code", "runs/lora-math"], base="default")
    """
    if not specialists:
        raise BricksError("fusion needs at least one specialist (K >= 1)")
    parts = [split_spec(s) for s in specialists]
    if base is None and all(a is not None for _, a in parts) and len({m for m, _ in parts}) == 1:
        base, specialists = parts[0][0], [a for _, a in parts]
    names = list(names) if names else [Path(split_spec(s)[1] or s).name for s in specialists]
    if len(names) != len(specialists):
        raise BricksError(f"{len(names)} names for {len(specialists)} specialists")
    if base is not None:
        model, tok = load_dense(base, device, dtype)
        bricks = []
        for spec, name in zip(specialists, names):
            brick = AdapterBrick.load(spec)
            brick.name = name
            bricks.append(brick)
        return FusedModel(AdapterSpecialists(model, bricks), width=width), tok
    models, vocab, tokenizers = [], None, []
    for spec in specialists:
        path, adapter = split_spec(spec)
        m, tok = load_dense(path, device, dtype)
        if adapter is not None:
            AdapterBrick.load(adapter).merge_into(m)
        if vocab is not None and tok.get_vocab() != vocab:
            raise BricksError(f"specialist {spec} has another tokenizer than {specialists[0]}: fusion mixes their "
                              "next-token logits, so they need one vocabulary")
        vocab = tok.get_vocab()
        models.append(m)
        tokenizers.append(tok)
    fused = FusedModel(ModelSpecialists(models, names), width=width)
    fused.chat_templates = chat_templates(tokenizers)
    return fused, tok


@torch.no_grad()
def compare_fusion(fused: FusedModel, domains, batch_size: int = 4) -> dict:
    """Held-out perplexity per domain (and `mixed`, all domains' tokens together) of the fused model, each
    specialist alone, and the specialists' uniform logit average (of the response tokens, for chat data)."""
    k = len(fused.names)
    settings = ["fused", *fused.names, "uniform"]
    nll = {s: {} for s in settings}
    for d in domains:
        total = torch.zeros(len(settings), dtype=torch.float64)
        for rows in batches(len(d.windows), batch_size, shard=False):
            x = d.windows[rows].to(fused.get_input_embeddings().weight.device)
            out = fused.specialists(x)
            w = fused.gate(out.hidden)
            variants = [(w[..., None] * out.logits).sum(1), *[out.logits[:, j] for j in range(k)], out.logits.mean(1)]
            target = next_token_targets(x, None if d.loss_mask is None else d.loss_mask[rows])  # chat: responses
            for i, logits in enumerate(variants):
                total[i] += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="sum")
        n = int(d.loss_mask[:, 1:].sum()) if d.loss_mask is not None else d.windows.shape[0] * (d.windows.shape[1] - 1)
        for i, s in enumerate(settings):
            nll[s][d.name] = (float(total[i]), n)
    ppl = {}
    for s in settings:
        per = {dom: math.exp(v / n) for dom, (v, n) in nll[s].items()}
        per["mixed"] = math.exp(sum(v for v, _ in nll[s].values()) / sum(n for _, n in nll[s].values()))
        ppl[s] = per
    return ppl
