"""Commands that merge whole models: `merge` (mergekit YAML) and `moe` (a Mixtral from dense models)."""

from __future__ import annotations

import click

from ..errors import BricksError
from ..io import parse_size
from ..merge.methods import METHODS
from .common import DATA_HELP, emit, json_option, main, user_errors


@main.command("merge", epilog="merge_method (in CONFIG): " + METHODS.help())
@click.argument("config", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="output model directory (must not exist)")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 500MB, 2GB")
@json_option
@user_errors
def merge_cmd(config, out, max_shard_size, as_json):
    """Merge models (and adapter bricks) as CONFIG (mergekit-style YAML) says, tensor by tensor, into OUT."""
    from ..merge.models import merge_models

    result = merge_models(config, out, max_shard_bytes=parse_size(max_shard_size))
    emit(as_json, result, f"wrote {out}: {result['method']} merge of {len(result['inputs'])} model(s), "
                          f"{result['tensors']} tensors in {result['shards']} shard(s)")


@main.command("moe")
@click.argument("config", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="output Mixtral checkpoint directory (must not exist)")
@click.option("--train-steps", default=0, show_default=True, help="train the router weights for this many steps on --data")
@click.option("--data", "data", multiple=True, help=DATA_HELP + " (text the routers are trained on)")
@click.option("--lr", default=1e-3, show_default=True, help="learning rate of router training")
@click.option("--seed", default=0, show_default=True, help="seed of random gates and of training batches")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest output shard, e.g. 500MB, 2GB")
@json_option
@user_errors
def moe_cmd(config, out, train_steps, data, lr, seed, max_shard_size, as_json):
    """Assemble a Mixtral MoE from dense models as CONFIG (mergekit-moe YAML) says: their FFNs become experts."""
    from ..merge.moe import assemble_moe, load_moe_config

    domains = None
    if train_steps > 0:
        if not data:
            raise BricksError("--train-steps needs text to train the routers on: add --data NAME=SOURCE")
        from transformers import AutoTokenizer

        from ..data import load_domains
        from ..loading import resolve

        cfg = load_moe_config(config)
        tok = AutoTokenizer.from_pretrained(resolve(cfg.base_model))
        domains = load_domains(data, tok, "train", 128, 64)
    result = assemble_moe(config, out, domains, train_steps, lr, seed, parse_size(max_shard_size),
                          log=None if as_json else click.echo)
    emit(as_json, result, f"wrote {out}: Mixtral with {result['experts']} experts x {result['layers']} layers "
                          f"({result['gate_mode']} gates{', trained' if train_steps else ''}), {result['shards']} shard(s)")
