"""Shared services: output checks, atomic directories, registries, `trainable`."""

import os

import pytest
import torch

from bricks.errors import BricksError
from bricks.io import atomic_dir, check_output, parse_size
from bricks.registry import Registry
from bricks.training import trainable


def test_check_output_refuses_what_cannot_be_written(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(BricksError, match="already exists"):
        check_output(tmp_path / "taken")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BricksError, match="is a file"):
        check_output(tmp_path / "file" / "sub" / "out")
    assert check_output(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "whole").write_text("x")
        (tmp / "whole").chmod(0o600)  # as safetensors and mkdtemp leave them
    assert (out / "whole").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777, (out / "whole").stat().st_mode & 0o777) == (0o777 & ~umask, 0o666 & ~umask)


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(BricksError, match="bad size"):
        parse_size("lots")


def test_registry_lists_known_names_in_errors_and_help():
    reg = Registry("thing")
    reg.add("a", 1, "first")

    @reg.register("b", "second")
    def b():
        return 2

    assert list(reg) == ["a", "b"] and reg.get("b") is b and "a" in reg and len(reg) == 2
    assert reg.help() == "a: first; b: second"
    with pytest.raises(BricksError, match="unknown thing 'c': choose from a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="twice"):
        reg.add("a", 3)


def test_trainable_restores_flags_and_mode_whatever_happens():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    model.eval()
    outside = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError):
        with trainable(model, [model[1].weight, outside]):
            model.train()
            assert [p.requires_grad for p in model.parameters()] == [False, False, True, False]
            assert outside.requires_grad
            raise RuntimeError("diverged")
    assert [p.requires_grad for p in model.parameters()] == before and not outside.requires_grad
    assert not model.training
