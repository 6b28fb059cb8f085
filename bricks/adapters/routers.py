"""Routing between adapter bricks: which brick, or which mix of bricks, each token uses.

The bricks are attached with `attach_adapters` (frozen, stacked per layer); a
router sets each token's mixing weights before the layers that use them.

- `arrow` (gradient-free, needs no data; the Arrow routing of Ostapenko et al.
  2024): in every adapted linear layer, a brick's prototype is the top right
  singular vector v of its ΔW, the input direction it changes most; a token x
  scores |<x, v>| for each brick and mixes the top-k by softmax.
- `prototype` (gradient-free, from sample text): at every decoder layer, the
  base model's hidden states of each brick's sample text give one prototype
  per brick, the brick's mean standardised hidden state; a token goes by the
  cosine similarity of its standardised hidden state to the prototypes
  (softmax with a temperature, or top-k).
- `gate` (trained, token-level, as X-LoRA / MoLE gate frozen adapters): the
  same per-layer linear gate, started from the prototypes and trained with the
  language-model loss on the bricks' mixed data; only the gate trains.

All three are causal (a token's route depends on it and what came before), so
they work unchanged in `generate()` with a KV cache.

    >>> multi = attach_adapters(model, [code, math])
    >>> router = fit_router(multi, "gate", train_domains)   # domains named like the bricks
    >>> with router.active():
    ...     model.generate(...)
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pydantic import BaseModel, ConfigDict, Field

from ..analysis.sparsity import perplexity
from ..arch import decoder_layers
from ..errors import BricksError
from ..io import atomic_dir, validated
from ..registry import Registry
from ..runtime import batches, run_model
from ..training import train_lm, trainable

FORMAT = "bricks.adapter_router"

# kind -> fit(router, domains, config, log): fills a fresh router's gates (see `fit_router`)
ADAPTER_ROUTERS: Registry = Registry("adapter router")


class RouteConfig(BaseModel):
    """Settings of `bricks route` and `fit_router` (flags and YAML files share this schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    router: str = "prototype"
    top_k: int | None = Field(None, ge=1)  # bricks mixed per token (None: all by softmax; arrow: 1)
    temperature: float = Field(0.05, gt=0, allow_inf_nan=False)  # prototype similarity temperature
    steps: int = Field(100, ge=1)  # gate training steps
    lr: float = Field(1e-2, gt=0, allow_inf_nan=False)  # gate learning rate
    windows: int = Field(64, ge=1)  # train windows per domain
    eval_windows: int = Field(16, ge=1)  # held-out windows per domain
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


def top_k_softmax(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Softmax over each row's top-k logits, zero elsewhere (all logits when top_k is None or >= n)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    vals, idx = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, idx, torch.softmax(vals, dim=-1))


class ArrowGate(nn.Module):
    """Per-token mix in one adapted linear layer from |<x, v_k>| (v_k: brick k's top input direction)."""

    def __init__(self, directions: torch.Tensor, top_k: int | None):
        super().__init__()
        self.register_buffer("directions", directions)  # [n, in]
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return top_k_softmax((x.to(self.directions.dtype) @ self.directions.t()).abs(), self.top_k)


class LayerGate(nn.Module):
    """Per-token mix at one decoder layer: a linear gate on the standardised, unit-length hidden state."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, top_k: int | None):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.weight = nn.Parameter(weight)  # [n, hidden]: temperature x unit prototypes at the start
        self.bias = nn.Parameter(weight.new_zeros(weight.shape[0]))
        self.top_k = top_k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.normalize((h.to(self.mean.dtype) - self.mean) / self.std, dim=-1)
        return top_k_softmax(z @ self.weight.t() + self.bias, self.top_k)


def _directions(layer, n_bricks: int) -> torch.Tensor:
    """Top right singular vector of each stacked brick's ΔW = B A in one MultiLoRALinear."""
    dirs = []
    for k in range(n_bricks):
        A, B = layer.A[k].double(), layer.B_flat[:, k * layer.A.shape[1] : (k + 1) * layer.A.shape[1]].double()
        if not B.abs().sum():  # a brick that does not adapt this layer never wins here
            dirs.append(torch.zeros(A.shape[1], dtype=torch.float64))
            continue
        # ΔW's right singular vectors lie in A's row space: SVD of the small [out, r] product B R, with A = Q R.
        Q, R = torch.linalg.qr(A.t())  # A^T = Q R, Q: [in, r]
        _, _, Vh = torch.linalg.svd(B @ R.t(), full_matrices=False)
        dirs.append(Q @ Vh[0])
    return torch.stack(dirs).to(layer.A.dtype)


class AdapterRouter:
    """A fitted router over the bricks of a `MultiAdapter`; `active()` routes the model's forward passes."""

    def __init__(self, multi, kind: str, gates: nn.ModuleDict, top_k: int | None, meta: dict | None = None):
        ADAPTER_ROUTERS.get(kind)  # unknown kinds: a one-line error listing the known ones
        self.multi, self.kind, self.gates, self.top_k = multi, kind, gates, top_k
        self.meta = meta or {}
        self._hooks: list = []
        self._installed = False

    # ------------------------------------------------------------------ routing
    def _layer_modules(self) -> dict[str, list]:
        """Decoder layer index -> the adapted linear layers inside it."""
        names = {id(m): n for n, m in self.multi.model.named_modules()}
        out = {}
        for i, block in enumerate(decoder_layers(self.multi.model)):
            prefix = names[id(block)] + "."
            out[str(i)] = [m for n, m in self.multi.layers.items() if n.startswith(prefix)]
        return out

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        if self.kind == "arrow":
            for name, layer in self.multi.layers.items():
                layer.gate = self.gates[name.replace(".", "/")]
            return
        per_layer = self._layer_modules()
        for i, block in enumerate(decoder_layers(self.multi.model)):
            gate, mods = self.gates[str(i)], per_layer[str(i)]

            def route(module, args, kwargs, gate=gate, mods=mods):
                h = args[0] if args else kwargs["hidden_states"]
                w = gate(h)
                for m in mods:
                    m.weights = w
            self._hooks.append(block.register_forward_pre_hook(route, with_kwargs=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._installed = False
        for layer in self.multi.layers.values():
            layer.gate = None
            layer.weights = None

    @contextlib.contextmanager
    def active(self):
        self.install()
        try:
            yield self.multi.model
        finally:
            self.remove()

    @torch.no_grad()
    def brick_shares(self, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Mean mixing weight of each brick over the tokens of `ids` and all routed layers: [n_bricks]."""
        total = torch.zeros(len(self.multi.bricks), dtype=torch.float64)
        count = 0

        def record(module, args, kwargs, out):  # noqa: ARG001
            nonlocal total, count
            w = out.detach().double().reshape(-1, out.shape[-1]).cpu()
            total += w.sum(0)
            count += w.shape[0]
        handles = [g.register_forward_hook(record, with_kwargs=True) for g in self.gates.values()]
        try:
            with self.active():
                for rows in batches(len(ids), batch_size, shard=False):
                    run_model(self.multi.model, ids[rows])
        finally:
            for h in handles:
                h.remove()
        return total / max(count, 1)

    # ------------------------------------------------------------------ files
    def write(self, directory: Path) -> None:
        """Write router.json and router.safetensors into an existing directory."""
        meta = {"format": FORMAT, "version": 1, "kind": self.kind, "top_k": self.top_k, "bricks": self.multi.names,
                **self.meta}
        state = {k: v.detach().contiguous() for k, v in self.gates.state_dict().items()}
        (directory / "router.json").write_text(json.dumps(meta, indent=1))
        save_file(state, str(directory / "router.safetensors"))

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            self.write(tmp)
        return Path(out)

    @classmethod
    def load(cls, path: str | Path, multi) -> "AdapterRouter":
        path = Path(path)
        try:
            meta = json.loads((path / "router.json").read_text())
            state = load_file(str(path / "router.safetensors"))
        except FileNotFoundError:
            raise BricksError(f"{path} is not an adapter router directory (router.json, router.safetensors)")
        except Exception as exc:
            raise BricksError(f"cannot read the adapter router in {path}: {exc} (corrupt files)") from exc
        if meta.get("format") != FORMAT:
            raise BricksError(f"{path} is not an adapter router (format {meta.get('format')!r})")
        if meta["bricks"] != multi.names:
            raise BricksError(f"the router in {path} routes bricks {meta['bricks']}, the model has {multi.names} attached: "
                              "attach the same bricks in the same order")
        gates = _empty_gates(multi, meta["kind"], meta["top_k"])
        try:
            gates.load_state_dict(state)
        except RuntimeError as exc:
            raise BricksError(f"the router in {path} does not fit this model: {str(exc).splitlines()[0]}") from exc
        kind, top_k = meta["kind"], meta["top_k"]
        extra = {k: v for k, v in meta.items() if k not in ("format", "version", "kind", "top_k", "bricks")}
        return cls(multi, kind, gates, top_k, extra)


def _empty_gates(multi, kind: str, top_k: int | None) -> nn.ModuleDict:
    """Gates of the right shapes, to be filled by fitting or by a saved state."""
    n = len(multi.bricks)
    some = next(iter(multi.layers.values()))
    dev = some.A.device
    gates = nn.ModuleDict()
    if kind == "arrow":
        for name, layer in multi.layers.items():
            gates[name.replace(".", "/")] = ArrowGate(torch.zeros(n, layer.A.shape[-1], device=dev), top_k)
    else:
        d = multi.model.get_input_embeddings().weight.shape[1]
        for i in range(len(decoder_layers(multi.model))):
            gates[str(i)] = LayerGate(torch.zeros(d, device=dev), torch.ones(d, device=dev), torch.zeros(n, d, device=dev), top_k)
    return gates


def _domains_for_bricks(multi, domains) -> list:
    by_name = {d.name: d for d in domains or []}
    missing = [b for b in multi.names if b not in by_name]
    if missing:
        raise BricksError(f"no sample data for brick(s) {missing}: give one data source per brick, named like it "
                          f"(e.g. --data {missing[0]}=builtin:code)")
    empty = [b for b in multi.names if by_name[b].windows.numel() == 0]
    if empty:
        raise BricksError(f"the sample data for brick(s) {empty} is empty")
    return [by_name[b] for b in multi.names]


@torch.no_grad()
def hidden_prototypes(multi, domains, batch_size: int = 8, max_windows: int = 64) -> tuple[torch.Tensor, ...]:
    """Per decoder layer: the mean and std of the base model's hidden states (each brick's data weighted alike)
    and each brick's unit prototype, its mean standardised hidden state. Shapes [L, d], [L, d], [L, n, d]."""
    model = multi.model
    blocks = decoder_layers(model)
    per_brick = _domains_for_bricks(multi, domains)
    L, n = len(blocks), len(per_brick)
    d = model.get_input_embeddings().weight.shape[1]
    sums = torch.zeros(n, L, d, dtype=torch.float64)
    sq = torch.zeros(n, L, d, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    k_now = 0

    def grab(module, args, kwargs, i):
        h = (args[0] if args else kwargs["hidden_states"]).detach().double().reshape(-1, d).cpu()
        sums[k_now, i] += h.sum(0)
        sq[k_now, i] += (h * h).sum(0)
    handles = [b.register_forward_pre_hook(lambda m, a, kw, i=i: grab(m, a, kw, i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for k, dom in enumerate(per_brick):  # the base model alone: no brick is routed while prototypes are taken
            k_now = k
            ids = dom.windows[:max_windows]
            for rows in batches(len(ids), batch_size, shard=False):
                run_model(model, ids[rows])
                counts[k] += ids[rows].numel()
    finally:
        for h in handles:
            h.remove()
    means = sums / counts[:, None, None]  # [n, L, d]
    mean = means.mean(0)
    var = (sq / counts[:, None, None]).mean(0) - mean**2
    std = var.clamp_min(0).sqrt().clamp_min(1e-6)
    protos = F.normalize((means - mean) / std, dim=-1).transpose(0, 1)  # [L, n, d]
    return mean.float(), std.float(), protos.float()


def fit_router(multi, kind: str, domains=None, top_k: int | None = None, temperature: float = 0.05, steps: int = 100,
               lr: float = 1e-2, batch_size: int = 8, seed: int = 0, log=None) -> AdapterRouter:
    """Fit a router over the attached bricks (see the module docstring).

    `domains` (train split, one per brick, named like the bricks) give the
    prototypes and the gate's training data; `arrow` needs none. `top_k`:
    bricks mixed per token (None: arrow's one, the others all by softmax);
    `temperature` scales the prototype cosine similarities into logits.

    Example:
        >>> router = fit_router(multi, "gate", train_domains, steps=100)
    """
    fit = ADAPTER_ROUTERS.get(kind)
    config = validated(RouteConfig, dict(router=kind, top_k=top_k, temperature=temperature, steps=steps, lr=lr,
                                         batch_size=batch_size, seed=seed), "adapter router settings")
    if top_k is None and kind == "arrow":
        top_k = 1
    if top_k is not None and top_k > len(multi.bricks):
        raise BricksError(f"top_k must be in [1, {len(multi.bricks)}] (the number of bricks), got {top_k}")
    router = AdapterRouter(multi, kind, _empty_gates(multi, kind, top_k), top_k)
    fit(router, domains, config, log)
    return router


@ADAPTER_ROUTERS.register("arrow", "gradient- and data-free: each token mixes the bricks whose top ΔW input direction "
                                   "it aligns with")
def _fit_arrow(router: AdapterRouter, domains, config: RouteConfig, log) -> None:
    for name, layer in router.multi.layers.items():
        router.gates[name.replace(".", "/")].directions.copy_(_directions(layer, len(router.multi.bricks)))


@ADAPTER_ROUTERS.register("prototype", "gradient-free: similarity of a token's hidden state to each brick's mean "
                                       "over sample text")
def _fit_prototype(router: AdapterRouter, domains, config: RouteConfig, log) -> None:
    mean, std, protos = hidden_prototypes(router.multi, domains, config.batch_size)
    for i, g in enumerate(router.gates.values()):
        g.mean.copy_(mean[i])
        g.std.copy_(std[i])
        g.weight.data.copy_(protos[i] / config.temperature)
    router.meta["temperature"] = config.temperature


@ADAPTER_ROUTERS.register("gate", "a token-level gate per layer, started from the prototypes and trained with the "
                                  "LM loss (X-LoRA, MoLE)")
def _fit_gate(router: AdapterRouter, domains, config: RouteConfig, log) -> None:
    if router.top_k == 1:
        raise BricksError("a trained gate needs top_k >= 2 or none (with one brick per token the gate gets no gradient)")
    _fit_prototype(router, domains, config, log)
    router.meta.update(train_gate(router, _domains_for_bricks(router.multi, domains), config.steps, config.lr,
                                  config.batch_size, config.seed, log))


def train_gate(router: AdapterRouter, domains, steps: int = 100, lr: float = 1e-2, batch_size: int = 8, seed: int = 0,
               log=None) -> dict:
    """Train the router's gates with the language-model loss on the domains' mixed windows; bricks and base stay frozen."""
    if steps < 1 or lr <= 0:
        raise BricksError(f"steps ({steps}) must be >= 1 and lr ({lr}) > 0")
    model = router.multi.model
    with trainable(model, router.gates.parameters()) as params, router.active():
        report = train_lm(model, torch.cat([d.windows for d in domains]), torch.optim.Adam(params, lr=lr), steps,
                          batch_size, seed, "gate", log)
    return {**report, "lr": lr}


@torch.no_grad()
def compare_routing(router: AdapterRouter, domains, batch_size: int = 8, baselines: bool = True) -> dict:
    """Held-out perplexity per domain of the base, each brick alone, their uniform mix (without `baselines`:
    only the routed bricks), and the routed bricks; plus `mixed` (all domains' tokens together) and each
    domain's mean routing weight per brick."""
    multi = router.multi
    n = len(multi.bricks)
    settings = {"base": [0.0] * n, **{b: [float(i == k) for i in range(n)] for k, b in enumerate(multi.names)},
                "uniform": [1.0 / n] * n}
    rows = {}

    def ppl_all(run) -> dict:
        res = {}
        nll = tok = 0.0
        for d in domains:
            p = run(d.windows)
            res[d.name] = p
            t = d.windows.shape[0] * (d.windows.shape[1] - 1)
            nll, tok = nll + math.log(p) * t, tok + t
        res["mixed"] = math.exp(nll / tok)
        return res
    for name, w in (settings.items() if baselines else ()):
        with multi.use(weights=[w]):
            rows[name] = ppl_all(lambda ids: perplexity(multi.model, ids, batch_size))
    with router.active():
        rows["routed"] = ppl_all(lambda ids: perplexity(multi.model, ids, batch_size))
    shares = {d.name: dict(zip(multi.names, router.brick_shares(d.windows, batch_size).tolist())) for d in domains}
    return {"ppl": rows, "shares": shares}
