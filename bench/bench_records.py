"""What a record costs against the frozen dataclass with the same body: to define, to build, to use.

Run: .venv/bin/python bench/bench_records.py [--classes 200] [--repeat 5]
Defines ``--classes`` classes of 12 fields (4 with defaults, 1 with a factory that == and hash
leave out) both ways, then times building instances (a record's first ``COMPILE_AFTER`` by the
generic ``__init__``, the rest by its compiled one), ``==``, ``hash``, ``repr`` and ``replace``.
Medians of ``--repeat`` runs, both sides interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from gpu_router import records

FIELDS = 12


def body(field: Callable[..., Any]) -> dict[str, Any]:
    names = [f"f{i}" for i in range(FIELDS)]
    annotations = {n: "int" for n in names}
    annotations["f11"] = "dict[str, int]"
    ns: dict[str, Any] = {"__annotations__": annotations, "__module__": __name__}
    for n in names[7:11]:
        ns[n] = 0
    ns["f11"] = field(default_factory=dict, compare=False)
    return ns


def define(kind: str, count: int) -> tuple[float, list[type]]:
    made = []
    t = time.perf_counter()
    for i in range(count):
        if kind == "record":
            made.append(records.record(type(f"R{i}", (), body(records.field))))
        else:
            made.append(dataclasses.dataclass(frozen=True)(type(f"D{i}", (), body(dataclasses.field))))
    return time.perf_counter() - t, made


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def time_uses(kind: str, cls: type, add: Callable[[str, str, float], None]) -> None:
    values = list(range(7))
    keywords = {f"f{i}": i for i in range(FIELDS - 1)}
    if kind == "record":
        first = time.perf_counter()
        for _ in range(records.COMPILE_AFTER):
            cls(*values)
        spent = time.perf_counter() - first
        add("first instances, generic __init__ (us)", kind, spent / records.COMPILE_AFTER * 1e6)
    add("build, 7 positional + defaults (us)", kind, per_call_us(lambda: cls(*values), 20_000))
    add("build, 11 keywords (us)", kind, per_call_us(lambda: cls(**keywords), 20_000))
    a, b = cls(*values), cls(*values)
    add("== (us)", kind, per_call_us(lambda: a == b, 50_000))
    add("hash (us)", kind, per_call_us(lambda: hash(a), 50_000))
    add("repr (us)", kind, per_call_us(lambda: repr(a), 20_000))
    add("dataclasses.replace (us)", kind, per_call_us(lambda: dataclasses.replace(a, f0=1), 10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    rows: dict[str, dict[str, list[float]]] = {}

    def add(what: str, kind: str, value: float) -> None:
        rows.setdefault(what, {}).setdefault(kind, []).append(value)

    for _ in range(args.repeat):
        for kind in ("dataclass", "record"):
            elapsed, classes = define(kind, args.classes)
            add("define a class (ms)", kind, elapsed / args.classes * 1e3)
            time_uses(kind, classes[0], add)

    print(f"records against frozen dataclasses: {args.classes} classes of {FIELDS} fields,", end=" ")
    print(f"median of {args.repeat} runs")
    print()
    print("| figure | dataclass | record | ratio |")
    print("|---|---|---|---|")
    for what, by in rows.items():
        d = statistics.median(by["dataclass"]) if "dataclass" in by else None
        r = statistics.median(by["record"])
        ratio = f"{r / d:.2f}x" if d else ""
        print(f"| {what} | {f'{d:.2f}' if d else 'n/a'} | {r:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
