"""gpu_router.records: a record behaves as the frozen dataclass with the same body, before and after
its own __init__ is compiled, and dataclasses' functions work on it."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading
from typing import Any, ClassVar, NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_router import records
from gpu_router.records import COMPILE_AFTER, field, record


class Pair(NamedTuple):
    low: int
    high: int


def make_rec() -> Any:
    """A new record class, the record side of the parity pairs (a new one starts generic)."""

    @record(order=True)
    class Rec:
        count: int
        name: str
        ratio: float = 0.5
        tags: tuple[str, ...] = ()
        extra: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
        weight: float = field(default=1.0, hash=False)
        limit: ClassVar[int] = 7

    Rec.__qualname__ = "Rec"  # as the module-level one, which pickle finds by that name
    return Rec


Rec = make_rec()


@dataclasses.dataclass(frozen=True, order=True)
class RecDc:
    """The dataclass side: the same body."""

    count: int
    name: str
    ratio: float = 0.5
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    weight: float = dataclasses.field(default=1.0, hash=False)
    limit: ClassVar[int] = 7


def compiled(cls: type, *sample: object) -> type:
    """`cls` after enough instances (of ``sample``, else ``1, "x"``) that its methods are compiled."""
    for _ in range(COMPILE_AFTER + 1):
        cls(*(sample or (1, "x")))
    for name in ("__init__", *cls.__record_spec__.shared):  # type: ignore[attr-defined]
        assert cls.__dict__[name].__code__.co_filename.startswith("<record "), name
    return cls


values = st.fixed_dictionaries(
    {
        "count": st.integers(-3, 3),
        "name": st.sampled_from(["a", "b"]),
        "ratio": st.sampled_from([0.0, 0.5, 2.0]),
        "tags": st.lists(st.sampled_from(["x", "y"]), max_size=2).map(tuple),
        "extra": st.dictionaries(st.sampled_from(["k", "j"]), st.integers(0, 2), max_size=2),
        "weight": st.sampled_from([1.0, 2.0]),
    }
)


@pytest.fixture(params=["generic", "compiled"])
def made(request: pytest.FixtureRequest) -> type:
    """A new record class, with its generic or its compiled methods."""
    return compiled(make_rec()) if request.param == "compiled" else make_rec()


@given(a=values, b=values)
def test_equality_hash_order_and_repr_match_the_dataclass(a: dict[str, Any], b: dict[str, Any]) -> None:
    for cls in (make_rec(), compiled(make_rec())):
        r1, r2, d1, d2 = cls(**a), cls(**b), RecDc(**a), RecDc(**b)
        assert (r1 == r2) == (d1 == d2)
        assert (r1 != r2) == (d1 != d2)
        assert (r1 < r2, r1 <= r2, r1 > r2, r1 >= r2) == (d1 < d2, d1 <= d2, d1 > d2, d1 >= d2)
        if r1 == r2:
            assert hash(r1) == hash(r2)
        assert hash(r1) == hash(d1)  # both hash the tuple of the hashed fields
        assert repr(r1) == repr(d1).replace("RecDc(", "Rec(")


def test_construction_by_position_keyword_and_default(made: type) -> None:
    r = made(2, "n", tags=("t",))
    assert (r.count, r.name, r.ratio, r.tags, r.extra, r.weight) == (2, "n", 0.5, ("t",), {}, 1.0)
    assert made(2, "n").extra is not made(2, "n").extra  # a fresh value from the factory each time
    given_extra = {"k": 1}
    assert made(2, "n", extra=given_extra).extra is given_extra
    assert made(count=1, name="m", weight=3.0) == made(1, "m", 0.5, (), {}, 3.0)


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((), {"count": 1}, "missing 1 required positional argument: 'name'"),
        ((), {}, "missing 2 required positional arguments: 'count' and 'name'"),
        ((1, "n"), {"colour": 1}, "unexpected keyword argument 'colour'"),
        ((1, "n"), {"count": 2}, "multiple values for argument 'count'"),
        ((1, "n", 0.1, (), {}, 1.0, "spare"), {}, "takes from 3 to 7 positional arguments but 8 were given"),
    ],
)
def test_wrong_arguments_are_a_type_error_as_for_any_function(
    made: type, args: tuple[Any, ...], kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(TypeError, match=words):
        made(*args, **kwargs)


def test_a_frozen_record_refuses_assignment_and_deletion_as_a_frozen_dataclass(made: type) -> None:
    r = made(1, "n")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'count'"):
        r.count = 2
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'name'"):
        del r.name
    assert r.count == 1


def test_a_mutable_record_can_be_changed_and_is_not_hashable() -> None:
    @record(frozen=False)
    class Counter:
        hits: int = 0
        seen: list[str] = field(default_factory=list)

    for cls in (Counter, compiled(Counter)):
        c = cls()
        c.hits += 1
        c.seen.append("x")
        assert c == cls(1, ["x"])
        assert c != cls()
        with pytest.raises(TypeError, match="unhashable"):
            hash(c)


def test_dataclasses_functions_work_on_a_record() -> None:
    r = Rec(1, "n", tags=("a",), extra={"k": 2})
    assert dataclasses.is_dataclass(Rec)
    assert dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(r)] == ["count", "name", "ratio", "tags", "extra", "weight"]
    assert [f.name for f in dataclasses.fields(Rec)] == [f.name for f in dataclasses.fields(RecDc)]
    assert dataclasses.asdict(r) == dataclasses.asdict(RecDc(1, "n", tags=("a",), extra={"k": 2}))
    assert dataclasses.astuple(r) == (1, "n", 0.5, ("a",), {"k": 2}, 1.0)
    changed = dataclasses.replace(r, count=5)
    assert (changed.count, changed.name, changed.extra) == (5, "n", {"k": 2})
    with pytest.raises(TypeError):
        dataclasses.replace(r, colour=1)


def test_the_records_own_helpers() -> None:
    @record
    class Inner:
        size: int

    @record
    class Outer:
        inner: Inner
        many: tuple[Inner, ...]
        pair: Pair
        by_name: dict[str, Inner]

    o = Outer(Inner(1), (Inner(2), Inner(3)), Pair(1, 2), {"a": Inner(4)})
    assert records.asdict(o) == {
        "inner": {"size": 1},
        "many": ({"size": 2}, {"size": 3}),
        "pair": Pair(1, 2),
        "by_name": {"a": {"size": 4}},
    }
    assert records.asdict(o) == dataclasses.asdict(o)
    assert records.replace(o, inner=Inner(9)).inner == Inner(9)
    assert records.replace(o, inner=Inner(9)).many is o.many
    assert [f.name for f in records.fields(Outer)] == ["inner", "many", "pair", "by_name"]
    assert records.field_names(Outer) == records.field_names(o) == ("inner", "many", "pair", "by_name")
    assert records.field_names(Pair(1, 2)) is None
    assert records.field_names(RecDc) is None
    assert records.fields(Rec)[2].default == 0.5
    assert records.fields(Rec)[4].default is records.MISSING
    assert records.is_record(o)
    assert records.is_record(Outer)
    assert not records.is_record(Pair(1, 2))
    assert not records.is_record(RecDc)
    with pytest.raises(TypeError, match="not a record"):
        records.replace(Pair(1, 2), low=3)


def test_class_attributes_and_match_args_are_as_dataclass_leaves_them() -> None:
    assert Rec.ratio == 0.5
    assert Rec.weight == 1.0
    assert "extra" not in Rec.__dict__  # a factory field leaves no class attribute
    assert Rec.limit == 7
    assert Rec.__match_args__ == RecDc.__match_args__
    match Rec(3, "m"):
        case Rec(count, name):
            assert (count, name) == (3, "m")
        case _:
            pytest.fail("the positional pattern did not match")


def test_methods_the_class_body_defines_are_kept_and_post_init_runs() -> None:
    seen: list[int] = []

    @record
    class Custom:
        size: int

        def __repr__(self) -> str:
            return "hidden"

        def __post_init__(self) -> None:
            seen.append(self.size)

    @record
    class OwnHash:
        size: int

        def __hash__(self) -> int:
            return 42

    @record
    class OwnEq:
        size: int

        def __eq__(self, other: object) -> bool:
            return True

    for cls in (Custom, compiled(Custom, 1)):
        assert repr(cls(1)) == "hidden"
    assert seen == [1] * (COMPILE_AFTER + 2) + [1]
    for cls in (OwnHash, compiled(OwnHash, 1)):
        assert hash(cls(1)) == 42
    # As dataclass: its __eq__ is kept; frozen, so the fields are hashed (compiled once it is hot).
    assert compiled(OwnEq, 1).__record_spec__.shared == ("__hash__",)  # type: ignore[attr-defined]
    assert OwnEq(1) == OwnEq(2)
    assert hash(OwnEq(1)) == hash((1,))


def test_copy_and_pickle_keep_a_record() -> None:
    r = Rec(1, "n", tags=("a",), extra={"k": 1})
    assert pickle.loads(pickle.dumps(r)) == r
    assert copy.copy(r) == r
    deep = copy.deepcopy(r)
    assert deep == r
    assert deep.extra is not r.extra


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        ("a: int = 1\n    b: int", TypeError, "non-default argument 'b' follows default argument"),
        ("a: list = []", ValueError, "mutable default <class 'list'> for field a"),
        ("a: 'InitVar[int]'", TypeError, "do not support InitVar"),
        ("a: int = dataclasses.field(default=1)", TypeError, "use gpu_router.records.field"),
        ("a: int\n    def __setattr__(self, n, v): pass", TypeError, "cannot define __setattr__"),
    ],
)
def test_a_class_the_records_cannot_make_is_refused_when_defined(
    body: str, error: type[Exception], words: str
) -> None:
    source = f"@record\nclass Bad:\n    {body}\n"
    with pytest.raises(error, match=words):
        exec(source, {"record": record, "dataclasses": dataclasses})


def test_a_record_cannot_inherit_from_a_record_or_a_dataclass() -> None:
    with pytest.raises(TypeError, match="cannot inherit from Rec"):

        @record
        class Sub(Rec):
            more: int = 0

    with pytest.raises(TypeError, match="cannot inherit from RecDc"):

        @record
        class SubDc(RecDc):
            more: int = 0


def test_threads_building_across_the_compile_build_the_right_records() -> None:
    @record
    class Point:
        x: int
        y: int = 0

    barrier = threading.Barrier(8)
    wrong: list[tuple[int, int]] = []

    def build(seed: int) -> None:
        barrier.wait()
        for i in range(COMPILE_AFTER * 4):
            p = Point(seed, y=i)
            if (p.x, p.y) != (seed, i):
                wrong.append((p.x, p.y))

    threads = [threading.Thread(target=build, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert Point.__dict__["__init__"].__code__.co_filename.startswith("<record ")


def test_every_record_of_the_package_constructs_from_its_own_fields() -> None:
    """The package's records, defined with @record, are dataclasses to anything that asks."""
    import importlib
    import pkgutil

    import gpu_router

    found = []
    for info in pkgutil.walk_packages(gpu_router.__path__, "gpu_router."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        found += [v for v in vars(module).values() if isinstance(v, type) and records.is_record(v)]
    assert len(found) > 60
    for cls in found:
        assert dataclasses.is_dataclass(cls)
        assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in records.fields(cls)]
        assert not any(isinstance(v, dataclasses.Field) for v in vars(cls).values())
