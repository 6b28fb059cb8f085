"""Files users give and files bricks writes: atomic output directories, YAML configs, sizes.

Every output is written into a temporary sibling and renamed into place only
when complete (`atomic_dir`), and refused up front when it already exists or
cannot be created (`check_output`), so that a failed or interrupted run never
leaves a half-written directory and never costs the user a long run first.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import BricksError


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output directory that exists (unless `overwrite`) or could not be created, before any work."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BricksError(f"output {path} already exists: choose another --out or remove it")
    parent = path.absolute().parent
    while not parent.exists():  # the nearest existing ancestor is where the directories will be made
        parent = parent.parent
    if not parent.is_dir():
        raise BricksError(f"cannot create output {path}: {parent} is a file, not a directory")
    try:  # permission bits do not tell everything (root, read-only or virtual file systems): try it
        os.rmdir(tempfile.mkdtemp(prefix=".bricks-probe-", dir=parent))
    except OSError as exc:
        raise BricksError(f"cannot create output {path}: {parent} is not writable ({exc.strerror}); "
                          "choose another --out") from None
    return path


class atomic_dir:
    """Context manager giving a temporary sibling directory that becomes `path` on success.

    On any error (or Ctrl-C) the temporary directory is removed and `path` is
    left as it was; an existing `path` is refused unless `overwrite`, also one
    that another run created while this one was writing (the first output
    survives). Temporary directories carry their process id, so that those of
    runs that died (kill -9, power loss) are found and removed by the next run.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_output(self.path, self.overwrite)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-", dir=self.path.parent))
        except OSError as exc:
            raise BricksError(f"cannot create output {self.path}: {exc.strerror or exc}; choose another --out") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _ordinary_modes(self.tmp)
        if self.overwrite and self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
            return False
        try:
            # Renaming a directory onto a non-empty one fails: a run that finished first keeps its output.
            os.rename(self.tmp, self.path)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise BricksError(f"output {self.path} was created by another run while this one was writing: "
                              "kept it and discarded this run's output") from None
        return False


def _ordinary_modes(root: Path) -> None:
    """Give an output the modes any file the user writes gets (the umask's), not mkdtemp's owner-only 700/600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(parent, f), 0o666 & ~umask)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary siblings of `path` left by runs whose process is gone; say so on stderr."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            print(f"removed {tmp}, left by a run of {path.name} that did not finish", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_yaml(path: str | os.PathLike, what: str, refused: dict[str, str] | None = None) -> dict:
    """The mapping in a YAML config file, or a one-line `BricksError`; a key of `refused` is an error (its reason)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BricksError(f"{what} config {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BricksError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BricksError(f"{path}: a {what} config is a mapping of keys to values")
    for key, reason in (refused or {}).items():
        if key in raw:
            raise BricksError(f"{path}: {key!r} {reason}")
    return raw


def validated(cls, raw: dict, where: str | os.PathLike):
    """`cls(**raw)` (a pydantic model) with its first complaint as a one-line `BricksError` naming the key."""
    from pydantic import ValidationError

    try:
        return cls(**raw)
    except ValidationError as exc:
        raise BricksError(f"{where}: {validation_message(exc)}") from exc


def validation_message(exc) -> str:
    """One line for a pydantic `ValidationError`: the first offending key and what is wrong with it."""
    err = exc.errors()[0]
    key = ".".join(str(x) for x in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{key}: {msg}{more}" if key else f"{msg}{more}"  # a check across keys has no key


def parse_size(text: str) -> int:
    """Bytes in a size written like 500MB, 2GB or 1.5GiB."""
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
