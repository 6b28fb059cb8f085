"""Out-of-core model merging from a mergekit-style YAML config (`bricks.merge.config`).

The config becomes a plan of output tensors, each merged from named input
tensors: with `models:`, tensor by tensor of whole models (one slice of all
their layers); with `slices:`, output layer j of a slice from layer
`start + offset` of each of its sources, the output layers numbered in slice
order (so `passthrough` slices stack layers of several models). Embeddings
come from the first slice's sources, the final norm and head from the last
one's, as mergekit does; a gradient parameter is read at the layer's relative
position in its slice, and at 0 for the tensors outside the layers (mergekit
0.1.5's plan).

Tensors are streamed one at a time from the inputs' safetensors shards and
written into sharded safetensors output. A merge holds at most one whole input
tensor (plus the base's and the output's) and row chunks of the others, so its
memory does not grow with the number of inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..adapters.lora import AdapterBrick
from ..errors import BricksError
from ..io import atomic_dir, check_output
from ..loading import split_spec
from .config import InputSlice, MergeConfig, OutputSlice, load_config, resolve
from .methods import MODEL_PARAMS, SHARED_PARAMS, merge
from .safetensors_io import Checkpoint, ShardedWriter, copy_side_files
from .tokenizers import chat_template, tokenizer_dir, write_chat_template
from .vocabulary import VocabularyPlan, is_vocabulary_tensor, plan_vocabulary, write_vocabulary

_LAYER = re.compile(r"(\.layers\.|\.h\.)(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def with_layer(name: str, layer: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}{layer}.", name, count=1)


@dataclass
class Source:
    """One input of a slice: a checkpoint (with an adapter applied, for `base+adapter`) and its layer range."""

    spec: str
    ckpt: Checkpoint
    adapter: AdapterBrick | None
    start: int
    levels: list[dict]  # its parameter settings, most specific first (source, slice, model)


@dataclass
class Job:
    """One output tensor: the input tensor of each source, the base's position among them, the relative depth."""

    out: str
    names: list[str]
    sources: list[Source]
    base: int | None
    t: float
    slice_params: dict


def _layers(ckpt: Checkpoint) -> int:
    return 1 + max([layer_of(n) for n in ckpt.names() if layer_of(n) is not None] or [-1])


def plan(config: MergeConfig) -> tuple[list[Job], Checkpoint, int]:
    """The output tensors of a merge, the reference checkpoint (config and side files) and the output depth."""
    opened: dict[str, tuple[Checkpoint, AdapterBrick | None]] = {}

    def open_spec(spec: str):
        if spec not in opened:
            path, adapter = split_spec(spec)
            if not Path(path).is_dir():
                raise BricksError(f"model {path} is not a directory (merging reads local checkpoints, never downloads)")
            opened[spec] = (Checkpoint(path), AdapterBrick.load(adapter) if adapter else None)
        return opened[spec]

    slices = config.slices
    if config.models:  # whole models: one slice of all their layers (the base joins it if it is not listed)
        specs = [m.model for m in config.models]
        if config.base_model and config.base_model not in specs:
            specs.append(config.base_model)
        slices = [OutputSlice(sources=[InputSlice(model=s, layer_range=(0, max(1, _layers(open_spec(s)[0]))),
                                                  parameters=config.model_parameters(s)) for s in specs])]
    grouped = []
    for sl in slices:
        sources = []
        for s in sl.sources:
            ckpt, adapter = open_spec(s.model)
            if s.layer_range[1] > max(1, _layers(ckpt)):
                raise BricksError(f"layer_range {list(s.layer_range)} of {s.model} goes past its {_layers(ckpt)} layers")
            sources.append(Source(s.model, ckpt, adapter, s.layer_range[0], [s.parameters, sl.parameters,
                                                                               config.model_parameters(s.model)]))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) > 1:
            raise BricksError(f"the models to merge differ in depth ({sorted(lengths)} layers): merge layer ranges of "
                              "equal length with 'slices'")
        base = next((i for i, s in enumerate(sources) if s.spec == config.base_model), None)
        grouped.append((sl, sources, base, lengths.pop()))
    reference = open_spec(config.base_model)[0] if config.base_model else grouped[0][1][0].ckpt
    _check_inputs(reference, [c for c, _ in opened.values()], [(c, a) for c, a in opened.values() if a],
                  reindexed_vocabulary=config.vocabulary_source is not None)
    first_layer = [n for n in reference.names() if layer_of(n) == 0] or [n for n in reference.names() if layer_of(n) is not None]
    templates = sorted({with_layer(n, 0) for n in first_layer})
    jobs: list[Job] = []
    outer = [n for n in reference.names() if layer_of(n) is None]
    pre = [n for n in outer if _is_input_embedding(n)]
    out_layer = 0
    for sl, sources, base, length in grouped:
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for tpl in templates:
                jobs.append(Job(with_layer(tpl, out_layer), [with_layer(tpl, s.start + offset) for s in sources],
                                sources, base, t, sl.parameters))
            out_layer += 1
    for names, (sl, sources, base, _), t in ((pre, grouped[0], 0.0), ([n for n in outer if n not in pre], grouped[-1], 0.0)):
        jobs += [Job(n, [n] * len(sources), sources, base, t, sl.parameters) for n in names]
    return jobs, reference, out_layer


def _is_input_embedding(name: str) -> bool:
    return any(k in name for k in ("embed_tokens", "wte", "wpe", "embed_in", "embed_positions"))


def _check_inputs(reference: Checkpoint, checkpoints: list[Checkpoint], adapted: list,
                  reindexed_vocabulary: bool = False) -> None:
    """Refuse inputs of another architecture (per tensor name and shape, layer count aside), and adapters whose
    deltas do not fit their base. Vocabulary sizes may differ when a tokenizer source re-indexes them."""
    kind = _model_type(reference.path)
    shapes = {with_layer(n, 0): reference.shape(n) for n in reference.names()}
    for ckpt in checkpoints:
        if _model_type(ckpt.path) != kind:
            raise BricksError(f"{ckpt.path} is a {_model_type(ckpt.path)} model, {reference.path} a {kind} model: "
                              "the models to merge differ in architecture")
        own = {with_layer(n, 0): ckpt.shape(n) for n in ckpt.names()}
        extra = sorted(set(own) - set(shapes))
        if extra:
            raise BricksError(f"{ckpt.path} has {extra[0]} (and {len(extra) - 1} more) that {reference.path} lacks: "
                              "the models to merge differ in architecture")
        missing = sorted(set(shapes) - set(own))
        if missing:
            raise BricksError(f"{ckpt.path} lacks {missing[0]} (and {len(missing) - 1} more): the models to merge "
                              "differ in architecture")
        for n, shape in own.items():
            if shape == shapes[n] or (reindexed_vocabulary and is_vocabulary_tensor(n) and shape[1:] == shapes[n][1:]):
                continue
            hint = (": their vocabularies differ, give tokenizer_source: union (or base, or a model) to re-index the "
                    "embeddings" if is_vocabulary_tensor(n) and shape[1:] == shapes[n][1:]
                    else ": shape mismatch, these models cannot be merged")
            raise BricksError(f"{ckpt.path}: {n} is {shape}, {reference.path} has {shapes[n]}{hint}")
    for ckpt, adapter in adapted:
        for mod, lora in adapter.modules.items():
            if f"{mod}.weight" not in ckpt.entries:
                raise BricksError(f"adapter {adapter.name!r} targets {mod}, which {ckpt.path} does not have: "
                                  "adapters for a different base")
            want = tuple(lora.delta().shape)
            if ckpt.shape(f"{mod}.weight") != want:
                raise BricksError(f"adapter {adapter.name!r}: {mod} is {ckpt.shape(f'{mod}.weight')} in {ckpt.path}, "
                                  f"the adapter's delta {want}: rank or shape mismatch")


def _setting(levels: list[dict], key: str):
    return next((p[key] for p in levels if key in p), None)


def run_merge(config: MergeConfig, out: str | Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
              progress=None) -> dict:
    """Merge tensor by tensor into `out` (atomic); returns a summary."""
    jobs, reference, depth = plan(config)
    compute_dtype = getattr(torch, config.dtype) if config.dtype else None
    out_dtype = getattr(torch, config.out_dtype) if config.out_dtype else compute_dtype
    first = config.base_model or (config.models[0].model if config.models else config.slices[0].sources[0].model)
    inputs = sorted({s.spec for j in jobs for s in j.sources})
    vocabulary = None
    if config.vocabulary_source:
        ordered = list(dict.fromkeys(s.spec for j in jobs for s in j.sources))  # config order, for the union
        settings = config.tokenizer
        vocabulary = plan_vocabulary(config.vocabulary_source, config.base_model, ordered,
                                     settings.pad_to_multiple_of if settings else None, settings.tokens if settings else None)

    def final_dtype(job):
        d = job.sources[0].ckpt.dtype(job.names[0])
        return out_dtype if (out_dtype is not None and d.is_floating_point) else d

    def shape(job):
        s = job.sources[0].ckpt.shape(job.names[0])
        return (vocabulary.size, *s[1:]) if vocabulary and is_vocabulary_tensor(job.out) else s

    writer_plan = [(j.out, shape(j), final_dtype(j)) for j in jobs]
    _return_freed_memory()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, writer_plan, max_shard_bytes)
        try:
            for i, job in enumerate(jobs):
                writer.write(job.out, _merge_job(config, job, compute_dtype, vocabulary).to(final_dtype(job)))
                if progress:
                    progress(i + 1, len(jobs))
        finally:
            writer.close()
        if vocabulary is None:
            source = tokenizer_dir(config.vocabulary_source, config.base_model, first)
            copy_side_files(Path(split_spec(source)[0]), reference.path, tmp, out_dtype)
        else:
            copy_side_files(None, reference.path, tmp, out_dtype)
            write_vocabulary(vocabulary, tmp)
        if config.chat_template:
            template = chat_template(config.chat_template, inputs)
            if template is not None:
                write_chat_template(tmp, template)
        if depth != _layers(reference):  # slices changed the depth: the config says so
            cfg = json.loads((tmp / "config.json").read_text())
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if key in cfg:
                    cfg[key] = depth
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "bricks_merge.yaml").write_text(yaml.safe_dump(config.model_dump(exclude_defaults=False), sort_keys=False))
    return {"out": str(out), "method": config.merge_method, "tensors": len(jobs), "shards": len(writer.files),
            "layers": depth, "inputs": inputs, "vocabulary": vocabulary.size if vocabulary else None}


def _merge_job(config: MergeConfig, job: Job, compute_dtype, vocabulary: VocabularyPlan | None = None) -> torch.Tensor:
    first = job.sources[0].ckpt
    if not first.dtype(job.names[0]).is_floating_point:
        return first.get(job.names[0])
    dtype = compute_dtype or (job.sources[job.base] if job.base is not None else job.sources[0]).ckpt.dtype(job.names[0])
    others = [k for k in range(len(job.sources)) if k != job.base]
    per_model = [{key: resolve(v, job.names[k], job.t) for key in MODEL_PARAMS
                  if (v := _setting([*job.sources[k].levels, config.parameters], key)) is not None} for k in others]
    shared = {key: resolve(v, job.out, job.t) for key in SHARED_PARAMS
              if (v := _setting([job.slice_params, config.parameters], key)) is not None}
    loaders = [functools.partial(_read, s.ckpt, s.adapter, name, dtype) for s, name in zip(job.sources, job.names)]
    if vocabulary is not None and is_vocabulary_tensor(job.out):
        loaders = _reindexed(vocabulary, job, dtype)
    tensors = [loaders[k] for k in others]
    base_of = loaders[job.base] if job.base is not None else None
    seed = int.from_bytes(hashlib.sha256(f"{config.seed}:{job.out}".encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(seed)  # per tensor: independent of the order tensors are merged in
    merged = merge(config.merge_method, base_of, tensors, per_model, shared, g)
    if not torch.isfinite(merged).all():
        bad = int((~torch.isfinite(merged)).sum())
        raise BricksError(f"merging {job.out} gave {bad} NaN or infinite values of {merged.numel()}: check the "
                          "weights (with normalize, weights that sum to 0 divide by zero)")
    return merged


def _reindexed(vocabulary: VocabularyPlan, job: Job, dtype) -> list:
    """Loaders of each source's vocabulary tensor in the merged vocabulary (rows by token, not by old id)."""
    by_spec = {s.spec: (s, n) for s, n in zip(job.sources, job.names)}

    def whole(spec, _name):
        if spec not in by_spec:
            raise BricksError(f"tokenizer.tokens: {job.out} takes rows from {spec}, which is not one of this tensor's "
                              f"inputs ({', '.join(by_spec)}): name one of them")
        s, n = by_spec[spec]
        return _read(s.ckpt, s.adapter, n, dtype)

    stand_ins = vocabulary.stand_ins(job.out, whole, list(by_spec))  # a slice's sources, in a slices: merge

    def loader(s, n):
        def rows_of(lo, hi):
            return _read(s.ckpt, s.adapter, n, dtype, slice(lo, hi))

        return lambda rows=None: vocabulary.align(s.spec, rows_of, stand_ins, rows)

    return [loader(s, n) for s, n in zip(job.sources, job.names)]


def _return_freed_memory() -> None:
    """Have glibc serve every allocation over 1 MB from its own mapping, returned to the system when freed.

    By default glibc raises that threshold up to 32 MB once large blocks have been freed, so the merge's
    row chunks and keep-masks (16-28 MB) then come from the heap, whose freed holes stay resident: that
    alone added ~150 MB to the peak of a merge of the default model. Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _read(ckpt: Checkpoint, adapter: AdapterBrick | None, name: str, dtype: torch.dtype,
          rows: slice | None = None) -> torch.Tensor:
    """One input tensor (or `rows` of it), with its adapter's delta applied; non-finite values are refused."""
    x = ckpt.get(name, rows).to(dtype)
    module = name.removesuffix(".weight")
    if adapter is not None and module in adapter.modules:
        x = x + adapter.modules[module].delta(torch.float32, rows).to(dtype)
    # A NaN or inf makes the sum non-finite; the sum is cheap (no mask tensor), and only when it is not finite
    # (which an overflow alone could also cause) is every entry checked.
    if x.is_floating_point() and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise BricksError(f"{ckpt.path}: {name} holds NaN or infinite values: refusing to merge it")
    return x


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def merge_models(config_path: str | Path, out: str | Path, **kwargs: Any) -> dict:
    """`bricks merge CONFIG.yaml --out DIR`: validate, then merge out of core."""
    check_output(out, kwargs.get("overwrite", False))
    return run_merge(load_config(config_path), out, **kwargs)
