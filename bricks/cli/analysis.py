"""Commands on emergent bricks: `info`, `analyze`, `partition`, `verify`."""

from __future__ import annotations

import click

from ..analysis.partition import PARTITIONERS
from ..errors import BricksError
from .common import DATA_HELP, config_option, emit, json_option, load, main, model_options, settings, user_errors


@main.command()
@click.argument("model")
@model_options
@json_option
@user_errors
def info(model, device, dtype, device_map, as_json):
    """Print MODEL's architecture, FFN layout and parameter counts."""
    from ..brick import model_fingerprint
    from ..loading import model_info

    m, _ = load(model, device, dtype, device_map)
    data = {**model_info(m), "fingerprint": model_fingerprint(m)}
    f = data["ffn"]
    human = (f"{model}: {data['model_type']}, {data['layers']} layers, hidden {data['hidden_size']}, FFN {data['d_ff']} neurons/layer\n"
             f"  FFN: {'gated ' if f['gated'] else ''}{f['activation']}; gate={f['gate']} up={f['up']} down={f['down']}"
             f"{' (Conv1D)' if f['conv1d'] else ''} at {f['layers_path']}.N.{f['mlp']}\n"
             f"  parameters: {data['parameters']['total']:,} total, {data['parameters']['ffn']:,} in FFNs "
             f"({100 * data['parameters']['ffn_share']:.1f}%); {data['dtype']} on {data['device']}")
    emit(as_json, data, human)


@main.command()
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(), help="output directory (must not exist)")
@click.option("--windows", default=48, show_default=True, help="train windows per domain for neuron statistics")
@click.option("--eval-windows", default=12, show_default=True, help="validation and held-out windows per domain for perplexity")
@click.option("--seq-len", default=128, show_default=True, help="tokens per window")
@click.option("--calib-tokens", default=1024, show_default=True, help="tokens that set the CETT thresholds")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--ppl-increase", default=1.0, show_default=True, help="p of CETT-PPL-p%, in percent")
@click.option("--ablate-fraction", default=0.05, show_default=True, help="share of neurons zeroed per domain")
@click.option("--seed", default=0, show_default=True)
@config_option
@model_options
@json_option
@click.pass_context
@user_errors
def analyze(ctx, model, data, out, windows, eval_windows, seq_len, calib_tokens, batch_size, ppl_increase,
            ablate_fraction, seed, config_file, device, dtype, device_map, as_json):
    """Measure activation sparsity (CETT-PPL-p%), per-domain specialization (FuncScore),
    its ablation check and co-activation modularity; write report.json and plots to OUT."""
    from ..analysis.report import AnalyzeConfig
    from ..analysis.report import analyze as run
    from ..data import parse_data_specs
    from ..io import check_output

    cfg = settings(ctx, config_file, AnalyzeConfig, windows=windows, eval_windows=eval_windows, seq_len=seq_len,
                   calib_tokens=calib_tokens, batch_size=batch_size, ppl_increase=ppl_increase,
                   ablate_fraction=ablate_fraction, seed=seed)
    specs = parse_data_specs(data)
    check_output(out)
    m, tok = load(model, device, dtype, device_map)
    report = run(m, tok, specs, cfg, out=out, spec=model)
    emit(as_json, report, _summary(report, out))


def _summary(r: dict, out: str) -> str:
    sp = r["sparsity"]
    lines = [
        f"{r['model']['spec']}: {r['data']['train_tokens']:,} train tokens over {', '.join(d['name'] for d in r['data']['domains'])}",
        f"sparsity (CETT-PPL-{sp['p']:g}%): CETT {sp['cett']:.3f}, mean activation ratio {sp['mean_activation_ratio']:.3f} "
        f"(sparsity {100 * sp['sparsity']:.1f}%), perplexity {sp['ppl_dense']:.3f} -> {sp['ppl_sparse']:.3f} "
        f"(+{100 * sp['achieved_increase']:.2f}%)",
    ]
    if r.get("specialization"):
        for d, v in r["specialization"]["per_domain"].items():
            lines.append(f"specialization {d}: best FuncScore > {r['specialization']['threshold']} in "
                         f"{v['layers_best_above']}/{len(v['best'])} layers (max {max(v['best']):.3f})")
        abl = r["ablation"]
        lines.append(f"ablation (top {100 * abl['fraction']:g}% neurons per domain zeroed), PPL change [ablated -> evaluated]:")
        for name, row in zip(abl["domains"], abl["relative_change"]):
            lines.append(f"  {name:>10}: " + "  ".join(f"{d}={100 * x:+.1f}%" for d, x in zip(abl["domains"], row)))
        lines.append(f"  zeroing a domain's neurons hurts that domain most (each row): {abl['diagonal_dominates']}")
        lines.append(f"  on each domain's text its own neurons cost most (each column): {abl['column_diagonal_dominates']}")
    lines.append(f"co-activation modularity (mean over layers): {r['coactivation']['mean_modularity']:.3f}")
    lines.append(f"wrote {out}/report.json and plots")
    return "\n".join(lines)


@main.command()
@click.argument("model")
@click.option("--method", required=True, help=f"partition method; {PARTITIONERS.help()}")
@click.option("--bricks", "n_bricks", required=True, type=int, help="bricks per layer (besides the shared one)")
@click.option("--out", required=True, type=click.Path(), help="output BrickSet directory (must not exist)")
@click.option("--data", "data", multiple=True, help=DATA_HELP + " (needed by coactivation, functional and --shared)")
@click.option("--shared", default=0.0, show_default=True, help="share of neurons (most often active) kept as an always-on shared brick")
@click.option("--windows", default=48, show_default=True, help="train windows per domain for activation statistics")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--cett", default=0.2, show_default=True, help="CETT whose per-layer thresholds define an active neuron")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@model_options
@json_option
@user_errors
def partition(model, method, n_bricks, out, data, shared, windows, seq_len, cett, batch_size, seed, device, dtype,
              device_map, as_json):
    """Cut every layer's FFN neurons into emergent bricks and save them as a BrickSet in OUT."""
    from ..analysis.partition import activation_statistics
    from ..analysis.partition import partition as run
    from ..data import parse_data_specs
    from ..io import check_output
    from ..runtime import world

    needs_stats = PARTITIONERS.get(method).needs_stats  # unknown methods fail before any loading
    if not 0.0 <= shared < 1.0:
        raise BricksError(f"--shared must be in [0, 1), got {shared}")
    if n_bricks < 1:
        raise BricksError(f"--bricks must be >= 1, got {n_bricks}")
    specs = parse_data_specs(data) if data else []
    if (needs_stats or shared > 0) and not specs:
        raise BricksError(f"method {method!r}{' with --shared' if shared else ''} needs activation data: pass --data NAME=SOURCE")
    check_output(out)
    m, tok = load(model, device, dtype, device_map)
    stats = activation_statistics(m, tok, specs, windows=windows, seq_len=seq_len, cett=cett, batch_size=batch_size) \
        if specs else None
    bs = run(m, method, n_bricks, stats, shared_fraction=shared, seed=seed,
             info={"model": model, "data": [f"{s.name}={s.source}" for s in specs], "cett": cett if specs else None})
    if world()[0] == 0:
        bs.save(out)
    sizes = [len(b.neurons) for b in bs.bricks(0)]
    data_out = {"out": str(out), "method": method, "layers": bs.n_layers, "bricks_per_layer": bs.n_bricks(0),
                "shared_brick": bs.shared[0] is not None, "brick_sizes_layer0": sizes, "fingerprint": bs.fingerprint}
    human = (f"wrote {out}: {bs.n_layers} layers x {bs.n_bricks(0)} bricks ({method}"
             f"{', one shared brick of ' + str(sizes[-1]) + ' neurons' if bs.shared[0] is not None else ''}; "
             f"routed brick size {min(sizes[:n_bricks])}-{max(sizes[:n_bricks])})")
    emit(as_json, data_out, human)


@main.command()
@click.argument("model")
@click.argument("brickset", type=click.Path())
@click.option("--data", "data", default="prose=builtin:prose", show_default=True, help="held-out text to compare logits on")
@click.option("--windows", default=2, show_default=True)
@click.option("--seq-len", default=64, show_default=True)
@model_options
@json_option
@user_errors
def verify(model, brickset, data, windows, seq_len, device, dtype, device_map, as_json):
    """Check that BRICKSET belongs to MODEL and that all its bricks together reproduce the dense logits."""
    from ..brick import BrickSet
    from ..data import DataSpec
    from ..data import windows as make_windows
    from ..routing import verify_bricks

    bs = BrickSet.load(brickset)
    spec = DataSpec.parse(data)
    m, tok = load(model, device, dtype, device_map)
    bs.check_model(m)
    ids = make_windows(tok, spec.source, "heldout", seq_len, windows)
    err = verify_bricks(m, bs, ids)
    sizes = [b.size for b in bs.bricks(0)]
    out = {"brickset": str(brickset), "method": bs.method, "layers": bs.n_layers, "bricks_per_layer": bs.n_bricks(0),
           "max_abs_logit_difference": err, "tokens": ids.numel()}
    emit(as_json, out, f"{brickset}: {bs.n_layers} layers x {bs.n_bricks(0)} bricks ({bs.method}, sizes "
                       f"{min(sizes)}-{max(sizes)}) match {model}\n"
                       f"  FFNs reassembled from the bricks' weights: max |logit difference| {err['reassembled']:.2e}\n"
                       f"  FFNs executed brick by brick:              max |logit difference| {err['brickwise']:.2e}\n"
                       f"  (over {ids.numel()} held-out tokens)")
