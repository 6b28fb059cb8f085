"""`bricks compress` (pruning, quantization) and `bricks cpet` (a compressed base recovered with bricks)."""

from __future__ import annotations

import click

from ..compress.build import COMPRESSORS, CompressConfig
from ..compress.cpet import CPETConfig
from .common import DATA_HELP, config_option, emit, json_option, log_to_stderr, main, model_options, settings, user_errors


@main.command("compress")
@click.argument("model")
@click.option("--method", "methods", multiple=True,
              help="repeatable, applied in order (a pruning, then a quantization or teal): " + COMPRESSORS.help())
@click.option("--sparsity", type=float, default=None,
              help="pruning: share of weights to remove; teal: share of FFN compute each token skips; in (0, 1)")
@click.option("--pattern", default=None, help="pruning: N:M structure instead of --sparsity, e.g. 2:4")
@click.option("--bits", type=int, default=None, help="then quantize: 8 (int8) or 4 (int4, NF4)")
@click.option("--data", "data", multiple=True, required=True, help=DATA_HELP + " (Wanda's calibration, held-out perplexity)")
@click.option("--windows", default=64, show_default=True, help="calibration windows per domain (train split)")
@click.option("--eval-windows", default=32, show_default=True, help="held-out windows per domain")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="compressed-model directory to write (must not exist)")
@config_option
@model_options
@json_option
@click.pass_context
@user_errors
def compress_cmd(ctx, model, methods, sparsity, pattern, bits, data, windows, eval_windows, seq_len, out, config_file,
                 device, dtype, device_map, as_json):
    """Compress MODEL (prune and/or quantize its decoder projections, or make its FFNs activation-sparse with
    teal) and write a directory that bricks.load_model (and, but for teal, transformers) opens; print the
    achieved sparsity, the bytes of the weights and the held-out perplexity against MODEL."""
    import torch

    from ..brick import model_fingerprint
    from ..compress import bf16_bytes, compress, methods_with_bits, save_compressed, weight_bytes
    from ..compress.build import check_model
    from ..configured import load_model
    from ..data import load_domains, parse_data_specs
    from ..evaluate import evaluate
    from ..io import check_output

    from ..runtime import Timeline

    cfg = settings(ctx, config_file, CompressConfig, methods=methods_with_bits(list(methods), bits), sparsity=sparsity,
                   pattern=pattern, windows=windows, eval_windows=eval_windows, seq_len=seq_len)
    specs = parse_data_specs(data)
    check_output(out)
    timeline = Timeline("compress")
    source, tok = load_model(model, device, dtype, device_map)
    check_model(source, cfg)  # shapes (an N:M pattern that does not divide) before any calibration
    heldout = load_domains(specs, tok, "heldout", cfg.seq_len, cfg.eval_windows)
    before = {"ppl": evaluate(source, heldout)["ppl"], "bytes": weight_bytes(source), "bf16_bytes": bf16_bytes(source)}
    timeline.done(f"source {model} evaluated on held-out data")
    fingerprint = model_fingerprint(source)
    calibration = None
    if cfg.needs_data:
        calibration = torch.cat([d.windows for d in load_domains(specs, tok, "train", cfg.seq_len, cfg.windows)])
    compressed, report = compress(source, tok, cfg, calibration)
    path = save_compressed(compressed, tok, out, report, model, fingerprint)
    timeline.done(f"compressed ({cfg.label()}) and written to {out}")
    reopened, _ = load_model(path, device, dtype)  # measured as saved, as a user will load it
    after = {"ppl": evaluate(reopened, heldout)["ppl"], "bytes": weight_bytes(reopened)}
    timeline.done("compressed model evaluated on held-out data")
    result = {"out": str(out), "compression": report, "source": before, "compressed": after}
    b16 = before["bf16_bytes"]
    what = "FFN compute each token skips" if cfg.sparsify else "sparsity of the decoder projections"
    zeros = "; pruned weights are stored as zeros (no bytes saved without a sparse format)"
    stored = (zeros + ", and teal reads fewer of them per token" if cfg.sparsify and cfg.pruning
              else "; teal stores every weight (each token reads fewer) and this directory refers to the source's"
              if cfg.sparsify else "" if cfg.quantization else zeros)
    lines = [f"compressed {model} with {cfg.label()}: {what} {report['achieved']['sparsity']:.1%}",
             f"weights: {after['bytes']['total'] / 1e6:.1f} MB ({after['bytes']['total'] / b16['total']:.2f}x the bf16 model), "
             f"decoder projections {after['bytes']['linear'] / 1e6:.1f} MB ({after['bytes']['linear'] / b16['linear']:.2f}x bf16)"
             + stored, "held-out perplexity, source -> compressed:"]
    lines += [f"  {d}: {before['ppl'][d]:.3f} -> {after['ppl'][d]:.3f} (x{after['ppl'][d] / before['ppl'][d]:.3f})"
              for d in before["ppl"]]
    lines.append(f"wrote {out}; recover with: bricks cpet {out} --adapter LORA --data ... --out DIR")
    emit(as_json, result, "\n".join(lines))


@main.command("cpet")
@click.argument("compressed", type=click.Path())
@click.option("--adapter", "adapter", required=True, type=click.Path(),
              help="LoRA_T: the adapter trained on the uncompressed model (brick or PEFT dir)")
@click.option("--teacher", default=None, help="the uncompressed model (default: the one COMPRESSED was made from; needed for a MoEfied directory)")
@click.option("--data", "data", multiple=True, required=True, help=DATA_HELP + " (training and held-out comparison)")
@click.option("--steps", default=200, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--beta", default=0.01, show_default=True, help="weight of the hidden-state distillation loss")
@click.option("--recovery-rank", default=32, show_default=True)
@click.option("--no-inherit", is_flag=True, help="ablation: a fresh LoRA instead of LoRA_T's factors")
@click.option("--no-recovery", is_flag=True, help="ablation: no recovery bricks")
@click.option("--no-distill", is_flag=True, help="ablation: cross-entropy only")
@click.option("--windows", default=256, show_default=True, help="train windows per domain")
@click.option("--eval-windows", default=32, show_default=True, help="held-out windows per domain")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="save training state here as it goes; a rerun resumes")
@click.option("--out", required=True, type=click.Path(), help="CPET directory to write (must not exist)")
@config_option
@click.option("--device", default=None, help="cpu, cuda, ... (default: cpu)")
@json_option
@click.pass_context
@user_errors
def cpet_cmd(ctx, compressed, adapter, teacher, data, steps, lr, batch_size, beta, recovery_rank, no_inherit, no_recovery,
             no_distill, windows, eval_windows, seq_len, seed, checkpoint, out, config_file, device, as_json):
    """Recover a COMPRESSED model (from bricks compress, or a MoEfied one from bricks moefy) with CPET: LoRA_T
    inherited, recovery bricks, distillation from the uncompressed teacher with LoRA_T; compare on held-out data
    with the teacher and with LoRA_T on the compressed model as it is; write a directory bricks.load_model opens.
    Data-parallel under `accelerate launch` (each process takes its share of every batch)."""
    from pathlib import Path

    import torch

    from ..adapters import AdapterBrick
    from ..compress import attach_cpet, read_compressed, save_cpet, train_cpet
    from ..compress.quantization import differentiable_4bit
    from ..compress.store import check_teacher, teacher_spec
    from ..configured import load_model
    from ..data import load_domains, parse_data_specs
    from ..evaluate import evaluate
    from ..io import check_output
    from ..runtime import Timeline, world

    cfg = settings(ctx, config_file, CPETConfig, steps=steps, lr=lr, batch_size=batch_size, beta=beta,
                   recovery_rank=recovery_rank, inherit=not no_inherit, recovery=not no_recovery, distill=not no_distill,
                   windows=windows, eval_windows=eval_windows, seq_len=seq_len, seed=seed)
    compressed = Path(compressed)
    doc = read_compressed(compressed)
    lora_t = AdapterBrick.load(adapter)
    specs = parse_data_specs(data)
    check_output(out)
    spec = teacher_spec(doc, compressed, teacher)
    log = log_to_stderr(as_json)
    timeline = Timeline("cpet")
    teacher_model, tok = load_model(spec, device)
    check_teacher(teacher_model, doc, compressed, spec)
    lora_t.merge_into(teacher_model)  # refuses an adapter trained for another base, in one line
    student, _ = load_model(compressed, device)
    differentiable_4bit(student)  # before any inference pass: a 4-bit student trains on the differentiable path
    heldout = load_domains(specs, tok, "heldout", cfg.seq_len, cfg.eval_windows)
    rows = {"uncompressed + LoRA_T": evaluate(teacher_model, heldout)["ppl"]}
    as_is = attach_cpet(student, lora_t, recovery_rank=None)
    rows["compressed + LoRA_T"] = evaluate(student, heldout)["ppl"]
    as_is.detach()
    timeline.done("teacher and compressed model with LoRA_T evaluated on held-out data")
    bricks = attach_cpet(student, lora_t, recovery_rank=cfg.recovery_rank if cfg.recovery else None, inherit=cfg.inherit,
                         seed=cfg.seed, base_model=spec)
    train = torch.cat([d.windows for d in load_domains(specs, tok, "train", cfg.seq_len, cfg.windows)])
    report = train_cpet(bricks, teacher_model if cfg.distill else None, train, cfg.steps, cfg.lr, cfg.batch_size, cfg.beta,
                        cfg.seed, log, checkpoint)
    timeline.done(f"trained {cfg.steps} steps")
    rows["CPET"] = evaluate(student, heldout)["ppl"]
    record = {"teacher": spec, "adapter": str(Path(adapter).resolve()), "settings": cfg.model_dump(), "training": report,
              "heldout_ppl": rows}
    if world()[0] == 0:  # under accelerate launch every process trained the same bricks; one writes them
        save_cpet(bricks, compressed, out, record, name=lora_t.name)
    parts = ", ".join(p for p, on in (("inheritance", cfg.inherit), ("recovery bricks", cfg.recovery),
                                      ("distillation", cfg.distill)) if on) or "a fresh LoRA only"
    cols = list(rows["CPET"])
    lines = [f"CPET on {compressed} ({doc['compression'].get('label')}): {parts}, {cfg.steps} steps",
             f"{'held-out perplexity':>24}" + "".join(f"{c:>10}" for c in cols)]
    lines += [f"{name:>24}" + "".join(f"{r[c]:>10.3f}" for c in cols) for name, r in rows.items()]
    lines.append(f"wrote {out}; open it with bricks.load_model({str(out)!r})")
    emit(as_json, {"out": str(out), **record}, "\n".join(lines))
