"""Commands on customized bricks: `adapter import|export|merge|info|train` and `route` between adapter bricks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..adapters.routers import ADAPTER_ROUTERS
from ..errors import BricksError
from ..merge.methods import METHODS
from .common import DATA_HELP, config_option, emit, json_option, load, main, model_options, settings, user_errors


@main.group()
def adapter():
    """Customized bricks: PEFT LoRA adapters as bricks (import, export, merge, info, train)."""


@adapter.command("import")
@click.argument("peft_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="adapter brick directory to write (must not exist)")
@click.option("--base", default=None, help="check the adapter against this model (dir, .gguf or 'default') first")
@json_option
@user_errors
def adapter_import(peft_dir, out, base, as_json):
    """Import a PEFT LoRA adapter directory as a brick."""
    from ..adapters import AdapterBrick
    from ..io import check_output

    brick = AdapterBrick.from_peft(peft_dir)
    check_output(out)
    if base is not None:
        m, _ = load(base, None, "float32", None)
        brick.check_model(m)
    brick.save(out)
    info = brick.info()
    emit(as_json, {"out": str(out), **info}, f"wrote {out}: LoRA brick {info['name']!r}, {info['modules']} modules "
                                             f"({', '.join(info['target_modules'])}), ranks {info['ranks']}")


@adapter.command("export")
@click.argument("brick_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="PEFT adapter directory to write (must not exist)")
@json_option
@user_errors
def adapter_export(brick_dir, out, as_json):
    """Export an adapter brick as a PEFT LoRA adapter directory (PeftModel.from_pretrained opens it)."""
    from ..adapters import load_customized

    load_customized(brick_dir).to_peft(out)  # a recovery brick refuses, saying why
    emit(as_json, {"out": str(out)}, f"wrote {out} (PEFT LoRA adapter)")


@adapter.command("merge")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weights", default=None, help="comma-separated weights, one per adapter (default: all 1)")
@click.option("--method", default="linear", show_default=True,
              help="one of " + ", ".join(m for m in METHODS if m not in ("slerp", "model_stock")))
@click.option("--density", default=None, type=float, help="density for the sparsifying methods (TIES, DARE, ...)")
@click.option("--rank", default=None, type=int, help="re-factor to this rank by SVD (default: exact, rank = sum of ranks)")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="adapter brick directory to write (must not exist)")
@click.option("--peft", "as_peft", is_flag=True, help="write a PEFT adapter directory instead of a brick")
@json_option
@user_errors
def adapter_merge(adapters, weights, method, density, rank, seed, out, as_peft, as_json):
    """Merge adapter bricks (or PEFT adapter dirs) in delta-weight space."""
    from ..adapters import AdapterBrick
    from ..io import check_output
    from ..merge import merge_adapters

    check_output(out)
    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise BricksError(f"bad --weights {weights!r}: comma-separated numbers, e.g. 0.6,0.4") from None
    per_model = [{"density": density}] * len(adapters) if density is not None else None
    merged, report = merge_adapters([AdapterBrick.load(a) for a in adapters], w, method, rank,
                                    model_params=per_model, seed=seed, name=Path(out).name)
    merged.to_peft(out) if as_peft else merged.save(out)
    err = report["truncation_error"]
    emit(as_json, {"out": str(out), **report}, f"wrote {out}: {method} merge of {len(adapters)} adapters, ranks "
                                               f"{report['ranks']}, SVD truncation error max {err['max']:.3g} mean {err['mean']:.3g}")


@adapter.command("info")
@click.argument("path", type=click.Path())
@json_option
@user_errors
def adapter_info(path, as_json):
    """Describe an adapter brick, a PEFT adapter directory or a recovery brick (CPET)."""
    from ..adapters import load_customized

    info = load_customized(path).info()
    emit(as_json, info, "\n".join(f"{k:>15}: {v}" for k, v in info.items()))


@adapter.command("train")
@click.argument("model")
@click.option("--data", "data", required=True, help="NAME=SOURCE: the text to train on (" + DATA_HELP.split("; ", 1)[1] + ")")
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
@model_options
@json_option
@user_errors
def adapter_train(model, data, out, rank, alpha, targets, steps, lr, batch_size, seq_len, windows, seed, as_peft, device,
                  dtype, device_map, as_json):
    """Train a LoRA adapter brick on MODEL with PEFT (a small one: minutes on CPU for the default model)."""
    from ..adapters import train_lora
    from ..data import load_domains
    from ..io import check_output

    check_output(out)
    m, tok = load(model, device, dtype, device_map)
    (dom,) = load_domains([data], tok, "train", seq_len, windows)
    brick, report = train_lora(m, dom.windows, dom.name, rank, alpha, [t.strip() for t in targets.split(",") if t.strip()],
                               steps, lr, batch_size, seed, log=None if as_json else click.echo, loss_mask=dom.loss_mask)
    (brick.to_peft if as_peft else brick.save)(out)
    emit(as_json, {"out": str(out), **report}, f"wrote {out}: LoRA r={rank} on {dom.name}, loss "
                                               f"{report['loss_first']:.3f} -> {report['loss_last']:.3f}")


@main.command("route")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="NAME=DIR: an adapter brick or PEFT adapter dir, repeatable (at least two)")
@click.option("--router", default="prototype", show_default=True, help=ADAPTER_ROUTERS.help())
@click.option("--data", "data", multiple=True,
              help=DATA_HELP + "; one per adapter, named like it (prototypes, gate training, evaluation)")
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
@config_option
@model_options
@json_option
@click.pass_context
@user_errors
def route(ctx, model, adapters, router, data, top_k, temperature, steps, lr, windows, eval_windows, seq_len, batch_size,
          seed, out, config_file, device, dtype, device_map, as_json):
    """Fit a router between adapter bricks (ARROW, PROTOTYPE or a trained token-level GATE) and compare it on
    held-out data with the base, each adapter alone and their uniform mix."""
    from ..adapters import AdapterBrick, attach_adapters, compare_routing, fit_router
    from ..adapters.routers import RouteConfig
    from ..data import load_domains, parse_data_specs
    from ..io import atomic_dir, check_output

    cfg = settings(ctx, config_file, RouteConfig, router=router, top_k=top_k, temperature=temperature, steps=steps, lr=lr,
                   windows=windows, eval_windows=eval_windows, seq_len=seq_len, batch_size=batch_size, seed=seed)
    check_output(out)
    ADAPTER_ROUTERS.get(cfg.router)
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
    m, tok = load(model, device, dtype, device_map)
    loaded = []
    for name, path in named:
        b = AdapterBrick.load(path)
        b.name = name
        loaded.append(b)
    multi = attach_adapters(m, loaded)
    train = load_domains(specs, tok, "train", cfg.seq_len, cfg.windows) if cfg.router != "arrow" else None
    fitted = fit_router(multi, cfg.router, train, cfg.top_k, cfg.temperature, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed,
                        log=None if as_json else click.echo)
    heldout = load_domains(specs, tok, "heldout", cfg.seq_len, cfg.eval_windows)
    report = compare_routing(fitted, heldout, cfg.batch_size)
    report.update({"router": cfg.router, "adapters": {n: str(p) for n, p in named}, **fitted.meta})
    fitted.meta["adapters"] = report["adapters"]
    with atomic_dir(out) as tmp:
        fitted.write(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    names = list(next(iter(report["ppl"].values())))
    click.echo(f"held-out perplexity ({cfg.router} router):")
    click.echo(f"{'':>12}" + "".join(f"{n:>10}" for n in names))
    for setting, row in report["ppl"].items():
        click.echo(f"{setting:>12}" + "".join(f"{row[n]:>10.3f}" for n in names))
    for dom, shares in report["shares"].items():
        click.echo(f"{dom}: mean routing weight " + ", ".join(f"{b} {s:.2f}" for b, s in shares.items()))
    click.echo(f"wrote {out}")
