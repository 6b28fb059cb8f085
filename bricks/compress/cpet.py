"""CPET (Zhao et al. 2023): a compressed base, a LoRA inherited from the uncompressed model, recovery bricks, distillation.

A LoRA trained on the full model (LoRA_T) works worse on a compressed copy of
it. CPET trains, on the compressed model, with three parts (each can be
switched off, for ablations):

- **inheritance**: the compressed model's LoRA starts from LoRA_T's factors
  (off: a fresh LoRA, A random and B zero, of the same rank);
- **recovery bricks** beside every adapted projection,
  `R(x) = (alpha/r) · U · GELU(D x)`, U zero at start (`bricks.adapters.recovery`);
- **distillation**: loss = CE + β · MSE(last hidden state of the student,
  last hidden state of the teacher = the uncompressed model with LoRA_T).

Only the LoRA factors and the recovery bricks train; the compressed weights
(pruned, or quantized by a library) stay as they are. The bricks sit beside
each projection in a `CPETLinear` wrapper, which calls the compressed module
unchanged, so any compression the module runs (a bitsandbytes or torchao
kernel) keeps running.

    >>> student = attach_cpet(compressed, lora_t)            # inherit + recovery bricks
    >>> report = train_cpet(student, teacher, windows, steps=200)
    >>> student.lora_brick("code"), student.recovery_brick("code")
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..adapters.lora import AdapterBrick, LoRAModule
from ..adapters.recovery import RecoveryBrick, RecoveryModule
from ..errors import BricksError
from ..routing.base import RoutedFFN
from ..training import TrainingCheckpoint, adamw_cosine, train_lm, trainable
from .quantization import differentiable_4bit, is_quantized

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CPETConfig(BaseModel):
    """Settings of `bricks cpet` (flags and YAML files share this schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(8, ge=1)
    beta: float = Field(0.01, ge=0, allow_inf_nan=False)  # weight of the hidden-state distillation loss
    recovery_rank: int = Field(32, ge=1)
    inherit: bool = True
    recovery: bool = True
    distill: bool = True
    windows: int = Field(256, ge=1)  # train windows
    eval_windows: int = Field(32, ge=1)  # held-out windows
    seq_len: int = Field(128, ge=2)
    seed: int = 0


class LoRAFactors(nn.Module):
    """Trainable LoRA factors of one projection: ΔW x = scaling · B (A x)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float, rslora: bool = False):
        super().__init__()
        self.A, self.B = nn.Parameter(A.detach().float().clone()), nn.Parameter(B.detach().float().clone())
        self.alpha, self.rslora = float(alpha), rslora

    @property
    def scaling(self) -> float:
        r = self.A.shape[0]
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B) * self.scaling


class CPETLinear(nn.Module):
    """A (compressed) projection with its customized bricks beside it: base(x) + LoRA(x) + R(x).

    `base` is None for a projection inside a routed FFN (teal or MoEfied), which runs the projection itself and
    adds `delta(x)` (see `FFNBricks`).
    """

    def __init__(self, base: nn.Module | None, lora: LoRAFactors | None, recovery: RecoveryModule | None):
        super().__init__()
        self.base, self.lora, self.recovery = base, lora, recovery

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """What the bricks add to the projection's output, in float32."""
        parts = [brick(x).float() for brick in (self.lora, self.recovery) if brick is not None]
        return sum(parts[1:], parts[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.lora is None and self.recovery is None else y + self.delta(x).to(y.dtype)


class FFNBricks(nn.Module):
    """CPET bricks beside the projections of a routed FFN (teal's `SparseFFN`, a MoEfied `BrickedFFN`), its `beside`
    module (`bricks.routing.beside`).

    The FFN reads only some rows of its weights per token; the bricks read the full input of their projection
    (x for gate and up, the activations the FFN computed for down), as they would beside a pruned or quantized
    projection.
    """

    def __init__(self, ffn: RoutedFFN, parts: dict[str, CPETLinear]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)  # by role: "gate", "up", "in" (a fused gate|up projection), "down"
        self.d_ff, self.gated = ffn.d_ff, ffn.gated

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the bricks add to the gate|up pre-activations `[..., k * d_ff]`."""
        if "in" in self.parts:
            return self.parts["in"].delta(x)
        roles = ("gate", "up") if self.gated else ("up",)
        return torch.cat([self.parts[r].delta(x) if r in self.parts else x.new_zeros(*x.shape[:-1], self.d_ff,
                                                                                      dtype=torch.float32)
                          for r in roles], -1)

    def output(self, a: torch.Tensor) -> torch.Tensor:
        """What the bricks add to the FFN output, from the activations `a`."""
        return self.parts["down"].delta(a) if "down" in self.parts else a.new_zeros(())


class CPETBricks(nn.Module):
    """The bricks attached to a model by `attach_cpet`: its state dict is theirs alone (what trains and is saved).

    The model is held outside the module tree, so that checkpoints and `parameters()` cover the bricks only.
    """

    def __init__(self, model: nn.Module, wrappers: dict[str, CPETLinear], base_model: str | None,
                 routed_ffns: list[RoutedFFN] = ()):
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "routed_ffns", list(routed_ffns))  # whose `beside` holds some of the wrappers
        self.lora = nn.ModuleDict({_key(n): w.lora for n, w in wrappers.items() if w.lora is not None})
        self.recovery = nn.ModuleDict({_key(n): w.recovery for n, w in wrappers.items() if w.recovery is not None})
        self.wrappers, self.base_model = wrappers, base_model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()  # where the training loop puts its batches

    def lora_brick(self, name: str = "cpet") -> AdapterBrick:
        """The LoRA part as an adapter brick (exports to PEFT; merges into an uncompressed base)."""
        modules = {n: LoRAModule(w.lora.A.detach().cpu().clone(), w.lora.B.detach().cpu().clone(), w.lora.alpha, w.lora.rslora)
                   for n, w in self.wrappers.items() if w.lora is not None}
        if not modules:
            raise BricksError("this CPET model has no LoRA part")
        m = next(iter(modules.values()))
        config = {"peft_type": "LORA", "r": m.rank, "lora_alpha": m.alpha, "use_rslora": m.rslora,
                  "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}), "bias": "none",
                  "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model}
        return AdapterBrick(modules, config, name)

    def recovery_brick(self, name: str = "recovery") -> RecoveryBrick | None:
        modules = {n: w.recovery for n, w in self.wrappers.items() if w.recovery is not None}
        return RecoveryBrick(modules, name, self.base_model) if modules else None

    def detach(self) -> nn.Module:
        """Put the bare projections back; returns the model as it was before `attach_cpet`."""
        named = dict(self.model.named_modules())
        for n, w in self.wrappers.items():
            if w.base is not None:
                parent, attr = n.rsplit(".", 1)
                setattr(named[parent], attr, w.base)
        for ffn in self.routed_ffns:
            ffn.beside = None
        return self.model


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def attach_cpet(model: nn.Module, lora: AdapterBrick | None = None, rank: int = 16, alpha: float | None = None,
                recovery_rank: int | None = 32, targets=TARGETS, inherit: bool = True, seed: int = 0,
                recovery: RecoveryBrick | None = None, base_model: str | None = None) -> CPETBricks:
    """Wrap `model`'s target projections (in place) with a LoRA and, unless `recovery_rank` is None, recovery bricks.

    `lora` (LoRA_T) gives the targets, rank and alpha; with `inherit` its factors start the LoRA, else a fresh
    LoRA of the same shape (A Kaiming-uniform, B zero, as PEFT initialises one). Without `lora`, a fresh LoRA
    of `rank` on `targets`. `recovery`: existing recovery bricks to attach instead of new ones (reloading).
    """
    named = dict(model.named_modules())
    routed = routed_projections(model)
    if lora is not None:
        if is_quantized(model) or routed:  # packed or routed-FFN weights have other shapes: compare sizes instead
            _check_names(lora, named, routed)
        else:
            lora.check_model(model)
        names = list(lora.modules)
    else:
        names = [n for n, m in named.items() if n.rsplit(".", 1)[-1] in targets and _is_projection(m)]
        names += [n for n in routed if n.rsplit(".", 1)[-1] in targets]
        if not names:
            raise BricksError(f"no projection named {', '.join(targets)} in this model: give the targets to adapt")
    gen = torch.Generator().manual_seed(seed)
    wrappers, beside = {}, {}
    for n in names:
        if n in routed:
            ffn, role, in_f, out_f = routed[n]
            base = None
            if ffn.beside is not None:
                raise BricksError(f"{n} already has CPET bricks attached: detach them first")
        else:
            base = named[n]
            if isinstance(base, CPETLinear):
                raise BricksError(f"{n} already has CPET bricks attached: detach them first")
            if not _is_projection(base):
                raise BricksError(f"{n} is a {type(base).__name__}, not a linear projection: CPET bricks wrap nn.Linear layers")
            out_f, in_f = base.out_features, base.in_features
        factors = None
        if lora is not None or rank:
            m = lora.modules[n] if lora is not None else None
            if m is not None and m.fan_in_fan_out:
                raise BricksError(f"{n}: Conv1D (fan_in_fan_out) adapters are not supported by CPET bricks")
            r, a = (m.rank, m.alpha) if m is not None else (rank, alpha if alpha is not None else 2 * rank)
            if m is not None and inherit:
                A, B = m.A, m.B
            else:
                A = torch.empty(r, in_f)
                bound = 1 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) on [r, in]
                A.uniform_(-bound, bound, generator=gen)
                B = torch.zeros(out_f, r)
            factors = LoRAFactors(A, B, a, m.rslora if m is not None else False)
        rec = None
        if recovery is not None:
            rec = recovery.modules.get(n)
            if rec is None:
                raise BricksError(f"the recovery brick has no module for {n}: it was trained for another adapter")
        elif recovery_rank:
            rec = RecoveryModule(in_f, out_f, recovery_rank, generator=gen)
        dev = _device_of(base if base is not None else ffn)
        wrapper = CPETLinear(base, factors.to(dev) if factors else None, rec.to(dev) if rec is not None else None)
        wrappers[n] = wrapper
        if base is None:
            beside.setdefault(ffn, {})[role] = wrapper
        else:
            parent, attr = n.rsplit(".", 1)
            setattr(named[parent], attr, wrapper)
    for ffn, parts in beside.items():
        ffn.beside = FFNBricks(ffn, parts)
    return CPETBricks(model, wrappers, base_model or (lora.base_model if lora is not None else None), list(beside))


def routed_projections(model: nn.Module) -> dict[str, tuple[RoutedFFN, str, int, int]]:
    """The dense projections that routed FFNs (teal, MoEfied) run themselves, by the name they had in the dense
    model: (FFN, role, in features, out features)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, RoutedFFN):
            for proj, role in m.projections.items():
                in_f, out_f = {"gate": (m.hidden, m.d_ff), "up": (m.hidden, m.d_ff), "in": (m.hidden, 2 * m.d_ff),
                               "down": (m.d_ff, m.hidden)}[role]
                out[f"{name}.{proj}"] = (m, role, in_f, out_f)
    return out


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


def _check_names(lora: AdapterBrick, named: dict, routed: dict) -> None:
    """For a quantized or routed model (weights of other shapes): the target projections exist with the LoRA's sizes."""
    for n, m in lora.modules.items():
        mod = named.get(n)
        sizes = routed[n][2:] if n in routed else (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
        if (mod is None and n not in routed) or sizes != (m.A.shape[1], m.B.shape[0]):
            raise BricksError(f"adapter {lora.name!r} targets {n}, which this model does not have with its shape: "
                              "the adapter was trained for another base")


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def last_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (after the last norm), the input of the LM head."""
    return model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state


def cpet_loss(student: nn.Module, teacher: nn.Module | None, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """CE of the student's next-token logits + β · MSE(student's, teacher's last hidden states); the parts too."""
    h = last_hidden(student, x)
    logits = student.get_output_embeddings()(h)[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten().to(logits.device))
    if teacher is None:
        return ce, {"ce": ce.item()}
    with torch.no_grad():
        target = last_hidden(teacher, x.to(_device_of(teacher))).float().to(h.device)
    mse = F.mse_loss(h.float(), target)
    return ce + beta * mse, {"ce": ce.item(), "mse": mse.item()}


def train_cpet(bricks: CPETBricks, teacher: nn.Module | None, windows: torch.Tensor, steps: int = 200, lr: float = 1e-3,
               batch_size: int = 8, beta: float = 0.01, seed: int = 0, log=None, checkpoint: str | None = None,
               checkpoint_every: int = 50) -> dict:
    """Train the attached bricks on token `windows` (train split): CE, plus β·MSE to `teacher` when one is given.

    The teacher is the uncompressed model with LoRA_T (None: no distillation). `checkpoint` (a file): save the
    state every `checkpoint_every` steps; a rerun with the same settings resumes from it.
    Returns the training report (loss of the first and last tenth, the distillation MSE at the first step).
    """
    if windows.numel() == 0:
        raise BricksError("no training windows: give --data with at least one window of tokens")
    params = list(bricks.parameters())
    if not params:
        raise BricksError("nothing to train: the CPET model has neither LoRA nor recovery bricks")
    student = bricks.model
    differentiable_4bit(student)  # a 4-bit model must train on bitsandbytes' differentiable path
    first = {}
    with torch.no_grad():
        _, parts = cpet_loss(student, teacher, windows[:batch_size].to(_device_of(bricks)), beta)
        first.update(parts)
    opt, sched = adamw_cosine(params, lr, steps)
    saver = None if checkpoint is None else TrainingCheckpoint(checkpoint, checkpoint_every)
    with trainable(student, params):
        student.train()
        report = train_lm(bricks, windows, opt, steps, batch_size, seed, "cpet", log, sched=sched, clip=params,
                          loss_fn=lambda _m, x: cpet_loss(student, teacher, x, beta)[0], checkpoint=saver,
                          settings={"lr": lr, "beta": beta, "distill": teacher is not None,
                                    "lora": len(bricks.lora), "recovery": len(bricks.recovery)})
    student.eval()
    report.update({"lr": lr, "beta": beta, "batch_size": batch_size, "start": first,
                   "tokens": steps * min(batch_size, len(windows)) * windows.shape[1]})
    return report
