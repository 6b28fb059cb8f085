"""The built-in offline corpora: text every Python installation carries, or generates, so that analyses and tests
run with no download. `bricks.data` assigns their documents to splits.

- code: the standard library's Python sources, one document per module;
- prose: the interpreter's own documentation topics (`pydoc_data.topics`);
- math: arithmetic word problems with worked answers, generated from a fixed seed.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Iterator

MATH_PROBLEMS = 50_000


def code_documents() -> Iterator[tuple[str, str]]:
    """(id, text) of every standard-library module, tests and tools left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__", "ensurepip", "config-3"}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in skip or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        yield str(rel), path.read_text(encoding="utf-8", errors="replace")


def prose_documents() -> Iterator[tuple[str, str]]:
    """(id, text) of every documentation topic."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield key, topics[key]


def math_problems(n: int = MATH_PROBLEMS) -> Iterator[str]:
    """`n` arithmetic word problems with their answers, the same ones on every run (small operands repeat)."""
    rng = random.Random(1)
    names = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun"]
    things = ["apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "cards"]

    def problem() -> str:
        kind = rng.randrange(8)
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if kind == 0:
            return f"Question: What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}. The answer is {a + b}."
        if kind == 1:
            a, b = max(a, b), min(a, b)
            return f"Question: What is {a} - {b}?\nAnswer: {a} - {b} = {a - b}. The answer is {a - b}."
        if kind == 2:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            return f"Question: What is {a} * {b}?\nAnswer: {a} * {b} = {a * b}. The answer is {a * b}."
        if kind == 3:
            b, q = rng.randint(2, 30), rng.randint(2, 60)
            return f"Question: What is {b * q} / {b}?\nAnswer: {b * q} / {b} = {q}. The answer is {q}."
        if kind == 4:
            x, k, c = rng.randint(-20, 20), rng.randint(2, 12), rng.randint(-50, 50)
            sign = "+" if c >= 0 else "-"
            return (f"Question: Solve for x: {k}x {sign} {abs(c)} = {k * x + c}.\n"
                    f"Answer: {k}x = {k * x + c} {'-' if c >= 0 else '+'} {abs(c)} = {k * x}, so x = {k * x} / {k} = {x}. The answer is {x}.")
        if kind == 5:
            p, n = rng.choice([5, 10, 20, 25, 50, 75]), rng.randint(1, 40) * 20
            return f"Question: What is {p}% of {n}?\nAnswer: {p}% of {n} is {n} * {p} / 100 = {n * p // 100}. The answer is {n * p // 100}."
        if kind == 6:
            who, what = rng.choice(names), rng.choice(things)
            a, b, c = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 4)
            total = a + b - c
            return (f"Question: {who} has {a} {what}, gets {b} more and gives {c} away. How many {what} does {who} have now?\n"
                    f"Answer: {a} + {b} = {a + b}, and {a + b} - {c} = {total}. The answer is {total}.")
        n, price = rng.randint(2, 12), rng.randint(2, 25)
        what = rng.choice(things)
        return (f"Question: One box of {what} costs {price} dollars. How much do {n} boxes cost?\n"
                f"Answer: {n} * {price} = {n * price}. The answer is {n * price} dollars.")

    for _ in range(n):
        yield problem()
