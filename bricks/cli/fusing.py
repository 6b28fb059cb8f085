"""`bricks fuse`: specialists fused by a token-level gate (UltraFuser), trained, compared and saved."""

from __future__ import annotations

import click

from ..errors import BricksError
from ..fusion.training import FuseConfig
from .common import DATA_HELP, config_option, emit, json_option, log_to_stderr, main, model_options, settings, user_errors


@main.command("fuse")
@click.argument("specialists", nargs=-1)
@click.option("--base", default=None, help="the specialists are adapters (bricks or PEFT dirs) on this model")
@click.option("--name", "names", multiple=True, help="a name per specialist, in order (default: directory names)")
@click.option("--data", "data", multiple=True, required=True, help=DATA_HELP + " (gate training and the held-out comparison)")
@click.option("--stage1-steps", default=100, show_default=True, help="gate training steps, specialists frozen")
@click.option("--stage2-steps", default=0, show_default=True,
              help="then gate and specialists together (their LoRA factors, or full weights for full models)")
@click.option("--lr", default=1e-3, show_default=True, help="stage-1 learning rate")
@click.option("--stage2-lr", default=1e-5, show_default=True)
@click.option("--batch-size", default=6, show_default=True)
@click.option("--proportional", is_flag=True, help="sample windows in proportion to the data instead of balanced batches")
@click.option("--width", default=512, show_default=True, help="hidden width of the gate")
@click.option("--windows", default=64, show_default=True, help="train windows per domain")
@click.option("--eval-windows", default=16, show_default=True, help="held-out windows per domain")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="save training state here as it goes; a rerun resumes")
@click.option("--out", required=True, type=click.Path(), help="fused-model directory to write (must not exist)")
@config_option
@model_options
@json_option
@click.pass_context
@user_errors
def fuse_cmd(ctx, specialists, base, names, data, stage1_steps, stage2_steps, lr, stage2_lr, batch_size, proportional,
             width, windows, eval_windows, seq_len, seed, checkpoint, out, config_file, device, dtype, device_map, as_json):
    """Fuse SPECIALISTS (model dirs, 'default', base+adapter, or adapters with --base) with a token-level gate,
    train it on --data, compare it on held-out data with each specialist and their uniform logit average, and
    write a directory bricks.load_model opens."""
    from ..data import load_domains, parse_data_specs
    from ..fusion import compare_fusion, fuse, gate_shares, plot_gate_shares, plot_token_gates, save_fused, train_fusion
    from ..io import check_output
    from ..runtime import world

    cfg = settings(ctx, config_file, FuseConfig, stage1_steps=stage1_steps, stage2_steps=stage2_steps, lr=lr,
                   stage2_lr=stage2_lr, batch_size=batch_size, balanced=not proportional, width=width, windows=windows,
                   eval_windows=eval_windows, seq_len=seq_len, seed=seed)
    if cfg.stage1_steps + cfg.stage2_steps == 0:
        raise BricksError("give --stage1-steps and/or --stage2-steps (both are 0)")
    if device_map is not None:
        raise BricksError("--device-map is not supported by fuse yet: use --device")
    specs = parse_data_specs(data)
    check_output(out)
    fused, tok = fuse(list(specialists), base, list(names) or None, cfg.width, device, dtype)
    train = load_domains(specs, tok, "train", cfg.seq_len, cfg.windows, templates=fused.chat_templates)
    report = train_fusion(fused, train, cfg.stage1_steps, cfg.stage2_steps, cfg.lr, cfg.stage2_lr, cfg.batch_size,
                          cfg.balanced, cfg.seed, log_to_stderr(as_json), checkpoint)
    heldout = load_domains(specs, tok, "heldout", cfg.seq_len, cfg.eval_windows, templates=fused.chat_templates)
    result = {"out": str(out), "specialists": fused.names, "training": report, "ppl": compare_fusion(fused, heldout),
              "gate_shares": gate_shares(fused, heldout)}
    if world()[0] == 0:  # under accelerate launch every process trained the same gate; one writes it
        path = save_fused(fused, tok, out, sources=None if base else list(specialists),
                          training={**report, "settings": cfg.model_dump()})
        plot_gate_shares(result["gate_shares"], path / "gate_shares.png")
        first = heldout[0].windows[0]
        sample = tok.decode((first[0] if first.dim() == 2 else first)[:48])
        plot_token_gates(fused, tok, sample, path / "token_gates.png")
    rows = result["ppl"]
    cols = list(next(iter(rows.values())))
    lines = [f"held-out perplexity (fused {len(fused.names)} specialists, gate trained {cfg.stage1_steps}"
             f"{' + ' + str(cfg.stage2_steps) if cfg.stage2_steps else ''} steps):",
             f"{'':>12}" + "".join(f"{c:>10}" for c in cols)]
    lines += [f"{name:>12}" + "".join(f"{row[c]:>10.3f}" for c in cols) for name, row in rows.items()]
    lines += [f"{dom}: mean gate weight " + ", ".join(f"{n} {w:.2f}" for n, w in shares.items())
              for dom, shares in result["gate_shares"].items()]
    lines.append(f"wrote {out} (with gate_shares.png, token_gates.png); open it with bricks.load_model({str(out)!r})")
    emit(as_json, result, "\n".join(lines))
