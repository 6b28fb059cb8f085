"""Commands on routed models: `moefy`, `eval`, `bench ffn`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import BricksError
from ..routing import ROUTERS
from ..runtime import Timeline
from .common import (DATA_HELP, config_option, emit, json_option, load, log_to_stderr, main, model_options, settings, user_errors)


@main.command()
@click.argument("model")
@click.option("--bricks", "brickset", default=None, type=click.Path(),
              help="BrickSet directory made from MODEL (bricks partition); not used by --router teal")
@click.option("--router", default=None,
              help=f"brick router ({ROUTERS.help()}); or teal: single neurons and input channels by magnitude, no "
                   "BrickSet. Default: teal without --bricks; with --bricks, hybrid if the BrickSet has a shared brick, "
                   "else mlp (both train on --data)")
@click.option("--active", default=0.5, show_default=True,
              help="share of routed bricks each token runs, in (0, 1] (teal: the FFN compute fraction)")
@click.option("--compute", default=None, type=float,
              help="instead of --active: FFN compute fraction per layer, router and shared brick included, in (0, 1]")
@click.option("--budget", type=click.Choice(["uniform", "sensitivity"]), default="uniform", show_default=True,
              help="with --compute: the same share in every layer, or per-layer shares by calibrated sensitivity")
@click.option("--selection", type=click.Choice(["topk", "threshold"]), default="topk", show_default=True,
              help="teal: keep each token's largest entries (exact shares), or those above magnitudes calibrated on "
                   "--data (TEAL's choice: cheaper for batches, shares vary per token)")
@click.option("--out", required=True, type=click.Path(), help="configured model directory to write (must not exist)")
@click.option("--data", "data", multiple=True,
              help=DATA_HELP + " (train split; trains or calibrates the router, the sensitivity budget, the thresholds)")
@click.option("--windows", default=32, show_default=True, help="train windows per domain for router training")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--epochs", default=20, show_default=True, help="router training epochs")
@click.option("--recover-steps", default=0, show_default=True,
              help="then fine-tune the model with its routers in the loop for this many steps (needs --data)")
@click.option("--recover-windows", default=512, show_default=True, help="train windows per domain for recovery")
@click.option("--recover-lr", default=5e-5, show_default=True, help="recovery learning rate (AdamW, cosine decay)")
@click.option("--recover-batch-size", default=8, show_default=True, help="recovery windows per step")
@click.option("--recover-objective", type=click.Choice(["distill", "lm"]), default="distill", show_default=True,
              help="recovery loss: match the dense model's next-token distribution, or the causal LM loss on the data")
@click.option("--recover-refit-routers", is_flag=True,
              help="mlp/hybrid routers keep learning during recovery, towards the current weights' top bricks")
@click.option("--recover-checkpoint", type=click.Path(dir_okay=False),
              help="save the recovery state to this file every 50 steps; rerunning the same command resumes from it "
                   "(deleted once --out is written)")
@config_option
@model_options
@json_option
@click.pass_context
@user_errors
def moefy(ctx, model, brickset, router, active, compute, budget, selection, out, data, windows, seq_len, epochs, recover_steps,
          recover_windows, recover_lr, recover_batch_size, recover_objective, recover_refit_routers, recover_checkpoint,
          config_file, device, dtype, device_map, as_json):
    """Turn MODEL into a MoE whose experts are the bricks of BRICKSET; write a directory load_model opens.

    With --router teal there is no BrickSet: every token runs the gate/up rows of its largest input channels
    and the down rows of its largest neurons (TEAL), at the FFN compute fraction --compute (or --active).
    """
    import torch

    from ..brick import BrickSet
    from ..configured import MoefyConfig, configuration, save_configured
    from ..configured import moefy as run
    from ..data import load_domains, parse_data_specs
    from ..io import check_output
    from ..routing import SparseFFN, compute_fraction

    if router is None:  # the README's recommendation: teal, or hybrid / mlp routers over a BrickSet
        router = "teal" if brickset is None else ("hybrid" if any(s is not None for s in BrickSet.load(brickset).shared)
                                                 else "mlp")
    cfg = settings(ctx, config_file, MoefyConfig, router=router, active=active, compute=compute, budget=budget,
                   selection=selection, windows=windows, seq_len=seq_len, epochs=epochs, recover_steps=recover_steps,
                   recover_windows=recover_windows, recover_lr=recover_lr, recover_batch_size=recover_batch_size,
                   recover_objective=recover_objective, recover_refit_routers=recover_refit_routers,
                   recover_checkpoint=recover_checkpoint)
    specs = parse_data_specs(data) if data else []
    cfg.check_inputs(has_bricks=brickset is not None, has_data=bool(specs))
    check_output(out)
    bs = None if cfg.sparse else BrickSet.load(brickset)
    m, tok = load(model, device, dtype, device_map)
    domains = load_domains(specs, tok, "train", cfg.seq_len, cfg.windows) if cfg.needs_training_data else None
    recover_data = None
    if cfg.recover_steps:
        recover_data = torch.cat([d.windows for d in load_domains(specs, tok, "train", cfg.seq_len, cfg.recover_windows)])
    run(m, bs, cfg.router, cfg.active, train_domains=domains, epochs=cfg.epochs, compute=cfg.compute, budget=cfg.budget,
        recover_windows=recover_data, recover_steps=cfg.recover_steps, recover_lr=cfg.recover_lr,
        recover_batch_size=cfg.recover_batch_size, recover_objective=cfg.recover_objective,
        recover_refit_routers=cfg.recover_refit_routers, recover_checkpoint=cfg.recover_checkpoint,
        selection=cfg.selection, log=log_to_stderr(as_json))
    state = configuration(m)
    save_configured(m, tok, out, source=model)
    if cfg.recover_checkpoint:
        Path(cfg.recover_checkpoint).unlink(missing_ok=True)  # the recovered model is saved: the training state is not needed
    recovery = state.reports.get("recovery")
    if cfg.sparse:
        layer = next(x for x in m.modules() if isinstance(x, SparseFFN))
        result = {"out": str(out), "router": cfg.router, "compute_fraction": compute_fraction(m), "keep_inputs": layer.keep_in,
                  "keep_neurons": layer.keep_act, "selection": cfg.selection, "thresholds": state.thresholds,
                  "recovery": recovery}
        kept = (f"the largest {layer.keep_in:.0%} of the FFN inputs, {layer.keep_act:.0%} of the neurons" if cfg.selection == "topk"
                else f"the FFN inputs and neurons above magnitudes calibrated to keep {layer.keep_in:.0%} and "
                     f"{layer.keep_act:.0%} on average")
        emit(as_json, result, f"wrote {out}: router teal, FFN compute fraction {result['compute_fraction']:.3f} "
                              f"(per token: {kept}); open it with bricks.load_model({str(out)!r})")
        return
    actives = state.active if isinstance(state.active, list) else [state.active]
    mean_active = sum(actives) / len(actives)
    report = state.reports.get("router_training", [])
    result = {"out": str(out), "router": cfg.router, "active": mean_active, "bricks_per_layer": bs.n_bricks(0),
              "layers": bs.n_layers, "router_training": report, "budget": state.reports.get("budget", {"kind": "uniform"}),
              "recovery": recovery}
    recall = f"; router recall of the oracle's top bricks {sum(r['recall_at_k'] for r in report) / len(report):.3f}" if report else ""
    shared = " + a shared brick" if bs.shared[0] is not None else ""
    routed = bs.n_bricks(0) - (1 if bs.shared[0] is not None else 0)
    emit(as_json, result, f"wrote {out}: {bs.n_layers} layers, {routed} routed bricks{shared} per layer, router {cfg.router}, "
                          f"{mean_active:g} of the routed bricks per token{recall}; open it with bricks.load_model({str(out)!r})")


@main.command("eval")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, help=DATA_HELP)
@click.option("--windows", default=16, show_default=True, help="held-out windows per domain")
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--baseline", is_flag=True, help="also evaluate the dense base model and print ratios")
@model_options
@json_option
@user_errors
def eval_cmd(model, data, windows, seq_len, batch_size, baseline, device, dtype, device_map, as_json):
    """Per-domain held-out perplexity, FFN compute fraction and tokens/s (with --baseline: dense figures and ratios)."""
    from ..configured import configuration, load_model
    from ..data import load_domains, parse_data_specs
    from ..evaluate import evaluate

    specs = parse_data_specs(data)
    m, tok = load(model, device, dtype, device_map)
    # A fused model reads chat prompts in each specialist's own template.
    domains = load_domains(specs, tok, "heldout", seq_len, windows, templates=getattr(m, "chat_templates", None))
    timeline = Timeline("eval")
    result = {"model": model, "seq_len": seq_len, "windows": windows, "model_eval": evaluate(m, domains, batch_size)}
    timeline.done(f"{model} on {result['model_eval']['tokens']:,} held-out tokens")
    if baseline and _is_fused(m):
        return _eval_fused(m, model, domains, batch_size, result, as_json)
    if baseline:
        # A recovered MoE's own dense weights were trained for routed execution, a compressed model's are not the
        # source's any more: compare with the source model.
        state = configuration(m)
        source = ((state.recovery if state is not None else None) or {}).get("base_model") or _compressed_source(model)
        del m
        if source is not None and not Path(source).exists():
            raise BricksError(f"the dense baseline of {model} is its source model {source}, which no longer exists; "
                              "evaluate that model separately")
        result["baseline_model"] = source or model
        result["recovered"] = source is not None
        base, _ = load_model(source or model, device=device, dtype=dtype, device_map=device_map, configured=False)
        result["baseline"] = evaluate(base, domains, batch_size)
        timeline.done(f"dense baseline {result['baseline_model']}")
        result["ratio"] = {
            "ppl": {d: result["model_eval"]["ppl"][d] / result["baseline"]["ppl"][d] for d in result["model_eval"]["ppl"]},
            "tokens_per_s": result["model_eval"]["tokens_per_s"] / result["baseline"]["tokens_per_s"],
        }
    ev = result["model_eval"]
    lines = [f"{model}: FFN compute fraction {ev['compute_fraction']:.3f} (plus {100 * ev['selection_fraction']:.2f}% "
             f"of the dense FFN's MACs in values ranked to choose what runs), {ev['executed_fraction']:.3f} executed, "
             f"{ev['tokens_per_s']:.0f} tokens/s"]
    for d, p in result["model_eval"]["ppl"].items():
        extra = f"  (dense {result['baseline']['ppl'][d]:.3f}, ratio {result['ratio']['ppl'][d]:.3f})" if baseline else ""
        lines.append(f"  {d:>10}: perplexity {p:.3f}{extra}")
    if baseline:
        lines.append(f"  tokens/s ratio to dense: {result['ratio']['tokens_per_s']:.2f}")
        lines += _explain(result, batch_size)
    emit(as_json, result, "\n".join(lines))


def _is_fused(m) -> bool:
    from ..fusion import FusedModel

    return isinstance(m, FusedModel)


def _compressed_source(model: str) -> str | None:
    """The source a compressed or CPET directory was made from (its recorded spec), else None."""
    from ..loading import CONFIGURED_MARKER

    marker = Path(model) / CONFIGURED_MARKER
    if not marker.is_file():
        return None
    doc = json.loads(marker.read_text())
    return (doc.get("source") or {}).get("spec") if doc.get("kind") in ("compressed", "cpet") else None


def _eval_fused(fused, model: str, domains, batch_size: int, result: dict, as_json: bool) -> None:
    """`eval --baseline` of a fused model: each specialist alone and their uniform logit average, on the same text."""
    from ..fusion import compare_fusion

    rows = compare_fusion(fused, domains, batch_size)
    result["baseline"] = {"specialists": {n: rows[n] for n in fused.names}, "uniform": rows["uniform"]}
    names = [*[d.name for d in domains], "mixed"]
    best = {d: min(fused.names, key=lambda n: rows[n][d]) for d in names}
    result["ratio"] = {"ppl_vs_best_specialist": {d: rows["fused"][d] / rows[best[d]][d] for d in names}}
    lines = [f"{model}: fused {len(fused.names)} specialists ({', '.join(fused.names)}), held-out perplexity:"]
    for d in names:
        lines.append(f"  {d:>10}: fused {rows['fused'][d]:.3f}, best specialist {best[d]} {rows[best[d]][d]:.3f} "
                     f"(ratio {result['ratio']['ppl_vs_best_specialist'][d]:.3f}), uniform average {rows['uniform'][d]:.3f}")
    emit(as_json, result, "\n".join(lines))


def _explain(result: dict, batch_size: int) -> list[str]:
    """One line per figure of a routed model that looks bad, saying why."""
    ev, ratio = result["model_eval"], result["ratio"]
    lines = []
    if ev["compute_fraction"] < 0.999 and ratio["tokens_per_s"] < 1:
        lines.append(f"  note: slower than dense here: eval runs batches of {batch_size} full windows, where one dense "
                     "matrix product beats per-token sparse ones and choosing what runs still costs; the saving is in "
                     "one-token decoding (bricks bench ffn, bench/bench_decode.py)")
    worst = max(ratio["ppl"].values())
    if ev["compute_fraction"] < 0.999 and worst > 1.1 and not result.get("recovered"):
        lines.append(f"  note: perplexity up to x{worst:.2f} dense: routing alone, before training; recovery "
                     "(moefy --recover-steps N --data ...) wins most of it back (bench/README.md)")
    return lines


@main.group()
def bench():
    """Benchmarks whose ratios are measured in one run."""


@bench.command("ffn")
@click.option("--shape", "shapes", multiple=True, default=("576x1536", "4096x11008"), show_default=True, help="HIDDENxD_FF, repeatable")
@click.option("--dtype", "dtypes", multiple=True, default=("float32", "bfloat16"), show_default=True)
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 32), show_default=True)
@click.option("--active", "actives", multiple=True, type=float, default=(0.5, 0.25), show_default=True)
@click.option("--bricks", "n_bricks", default=64, show_default=True)
@click.option("--router", default="centroid", show_default=True,
              help="brick router, or teal: the activation-sparse FFN with --active as its compute fraction")
@click.option("--reps", default=20, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--busy", default=0, show_default=True, type=click.IntRange(0, 64),
              help="other processes kept busy on the CPU meanwhile (a loaded machine)")
@click.option("--path", default=None, help="run the routed FFN on this execution path (default: the fastest by timing)")
@click.option("--dense-fallback", is_flag=True,
              help="let the routed FFN run densely where that is faster (serving; on the CPU the dense calls run a copy of its weights)")
@click.option("--selection", type=click.Choice(["topk", "threshold"]), default="topk", show_default=True,
              help="teal: top-k per token, or thresholds calibrated on inputs drawn like the timed ones")
@json_option
@user_errors
def bench_ffn_cmd(shapes, dtypes, batches, actives, n_bricks, router, reps, device, busy, path, dense_fallback, selection,
                  as_json):
    """Dense vs bricked FFN latency (random weights), speedup = dense / bricked by the median of the calls and by
    their mean (which counts calls that stalled on a busy machine), router cost included."""
    from ..routing.bench import bench_ffn

    parsed = []
    for s in shapes:
        try:
            hidden, d_ff = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise BricksError(f"bad --shape {s!r}: expected HIDDENxD_FF, e.g. 4096x11008") from None
        parsed.append((hidden, d_ff))
    for a in actives:
        if not 0 < a <= 1:
            raise BricksError(f"active fraction must be in (0, 1], got {a}")
    rows = bench_ffn(parsed, dtypes, batches, actives, n_bricks, router, reps, device, busy=busy, path=path,
                     dense_fallback=dense_fallback, selection=selection, progress=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
