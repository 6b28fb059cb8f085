"""Registries: extension points (partitioners, routers, merge methods, adapter routers, ...) found by name.

One style everywhere: a `Registry` maps a name to a class or function, with
a one-line summary for `--help`; asking for an unknown name is a one-line
error that lists the known ones.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import BricksError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry (a class or a function), in registration order.

    Example:
        >>> PARTITIONERS = Registry("partition method")
        >>> @PARTITIONERS.register("random", "neurons dealt out at random")
        ... def random_split(...): ...
        >>> PARTITIONERS.get("random")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        """Decorator: file the decorated class or function under `name`."""
        def deco(entry: T) -> T:
            self.add(name, entry, summary)
            return entry
        return deco

    def add(self, name: str, entry: T, summary: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        self._summaries[name] = summary

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise BricksError(f"unknown {self.kind} {name!r}: choose from {self.names()}")
        return self._entries[name]

    def names(self) -> str:
        """The known names, comma-separated (for errors and help texts)."""
        return ", ".join(self._entries)

    def help(self) -> str:
        """One `name: summary` per entry, for a command's `--help`."""
        return "; ".join(f"{n}: {s}" if s else n for n, s in self._summaries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def items(self):
        return self._entries.items()
