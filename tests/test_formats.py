"""On-disk formats stay readable: directories written by an earlier version of bricks open with the same results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import bricks
from bricks.adapters import AdapterBrick
from bricks.cli import main
from bricks.routing import set_path

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture(scope="module")
def expected():
    return load_file(str(LEGACY / "expected.safetensors"))


@pytest.mark.parametrize("name", ["moe-centroid", "moe-teal"])
def test_configured_models_of_the_previous_version_open(name, expected, tmp_path):
    model, tok = bricks.load_model(LEGACY / name)
    assert bricks.configuration(model) is not None and bricks.configuration(model).kind == "moe"
    path = "bags" if name == "moe-teal" else "bricks"  # the path the expected logits ran
    set_path(model, path)
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    # Equal up to the order of float additions (the bags read small weights' rows unsorted now).
    torch.testing.assert_close(logits, expected[name.replace("-", "_")], rtol=1e-5, atol=1e-6)
    # Saved again by this version, it reads back to the same model.
    again, _ = bricks.load_model(bricks.save_configured(model, tok, tmp_path / "again"))
    set_path(again, path)
    with torch.no_grad():
        assert torch.equal(again(expected["ids"]).logits, logits)


def test_brickset_of_the_previous_version_opens_and_fits_its_model():
    bs = bricks.BrickSet.load(LEGACY / "brickset")
    dense, _ = bricks.load_model(LEGACY / "moe-centroid", configured=False)
    bs.check_model(dense)
    assert bs == bricks.BrickSet.load(LEGACY / "moe-centroid" / "bricks")
    assert bs.method == "param-kmeans" and bs.n_bricks(0) == 4


def test_adapter_brick_of_the_previous_version_opens(expected):
    brick = AdapterBrick.load(LEGACY / "adapter")
    assert brick.name == "legacy"
    deltas = brick.deltas()
    assert set(deltas) == {k.removeprefix("delta.") for k in expected if k.startswith("delta.")}
    for k, v in deltas.items():
        assert torch.equal(v, expected[f"delta.{k}"])


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("command", list(_commands(main)), ids=" ".join)
def test_every_command_has_help(command):
    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output, r.output


def test_python_m_bricks_cli_knows_every_command():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bricks.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in main.commands:
        assert f"  {name} " in r.stdout, name
    r = subprocess.run([sys.executable, "-m", "bricks.cli", "route", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--adapter" in r.stdout, r.stderr


def test_every_registry_name_is_in_its_help():
    from bricks.adapters.routers import ADAPTER_ROUTERS
    from bricks.analysis.partition import PARTITIONERS
    from bricks.compress import COMPRESSORS
    from bricks.merge.methods import METHODS
    from bricks.routing import ROUTERS

    for command, registry in ((["partition"], PARTITIONERS), (["moefy"], [*ROUTERS, "teal"]), (["route"], ADAPTER_ROUTERS),
                              (["merge"], METHODS), (["compress"], COMPRESSORS),
                              (["adapter", "merge"], [m for m in METHODS if m not in ("slerp", "model_stock")])):
        text = " ".join(CliRunner().invoke(main, [*command, "--help"], terminal_width=400).output.split())
        missing = [name for name in registry if name not in text]
        assert not missing, f"bricks {' '.join(command)} --help does not name {missing}"
