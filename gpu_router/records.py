"""Record classes (dataclasses) that cost almost nothing to define.

`@record` makes the class that `@dataclasses.dataclass(frozen=True)` makes (`frozen=False` and
`order=True` as there): the same `__init__`, equality, hash, repr, ordering and frozen errors, and
`dataclasses.fields`, `replace`, `asdict` and `is_dataclass` work on it, as type checkers expect.

What differs is when the work is done. `dataclass` writes six methods per class as source text and
compiles them when the module is imported: about 1.7 ms a class on a 2-core machine, 85 ms of a
190 ms one-node report, whose ~50 records are each built a handful of times. A record is defined
in about 0.1 ms (`bench/bench_records.py`):

* a class's first `COMPILE_AFTER` instances are built by a generic `__init__`, and `==`, hash
  and ordering are shared functions over attribute getters;
* after that the class is a hot one: its own `__init__`, `==`, hash and ordering are written
  and compiled as `dataclass` writes them, and cost the same per call from then on;
* `repr` stays shared (half the speed of a generated one: it is for logs and debugging);
* `dataclasses` itself (with `inspect`, `ast` and `dis`, 11 ms) is imported only when something
  asks it about a record or assigns to a frozen one.

Options the codebase does not use (`init=False`, `kw_only`, `InitVar`, inheriting from a record)
are refused with a `TypeError` when the class is defined rather than half-supported.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

if TYPE_CHECKING:
    # Type checkers see dataclasses' own replace(), which they check field by field.
    from dataclasses import replace as replace

    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda f: f


__all__ = ["MISSING", "Field", "asdict", "field", "field_names", "fields", "is_record", "record", "replace"]

COMPILE_AFTER: Final = 32
"""Instances of a class built by the generic `__init__` before its own is compiled (~0.4 ms)."""

_T = TypeVar("_T", bound=type)
_Getter = Callable[[object], Any]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _Missing()
"""A field's `default` or `default_factory` when it has none."""


class Field:
    """One field of a record: what `field()` was given, with the name and annotation."""

    __slots__ = ("compare", "default", "default_factory", "hash", "name", "repr", "type")

    def __init__(
        self, default: Any, default_factory: Any, repr: bool, hash: bool | None, compare: bool
    ) -> None:
        self.name = ""
        self.type: Any = None
        self.default = default
        self.default_factory = default_factory
        self.repr = repr
        self.hash = hash
        self.compare = compare

    def __repr__(self) -> str:
        return (
            f"Field(name={self.name!r}, default={self.default!r}, default_factory={self.default_factory!r})"
        )


def field(
    *,
    default: Any = MISSING,
    default_factory: Callable[[], Any] | Any = MISSING,
    repr: bool = True,
    hash: bool | None = None,
    compare: bool = True,
) -> Any:
    """A field's default (or factory for a fresh mutable value) and whether repr, hash and == use it."""
    if default is not MISSING and default_factory is not MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return Field(default, default_factory, repr, hash, compare)


@overload
def record(cls: _T, /) -> _T: ...
@overload
def record(*, frozen: bool = True, order: bool = False) -> Callable[[_T], _T]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def record(cls: _T | None = None, /, *, frozen: bool = True, order: bool = False) -> _T | Callable[[_T], _T]:
    """Make `cls` a dataclass: frozen unless `frozen=False`; `order=True` adds <, <=, >, >=."""

    def wrap(cls: _T) -> _T:
        _build(cls, frozen, order)
        return cls

    return wrap if cls is None else wrap(cls)


class _Spec:
    """What a record class's shared methods need to know about it."""

    __slots__ = (
        "by_name",
        "calls",
        "cls",
        "compared",
        "fields",
        "frozen",
        "hashed",
        "names",
        "post_init",
        "shared",
    )

    def __init__(self, cls: type, fields: tuple[Field, ...], frozen: bool) -> None:
        self.cls = cls
        self.fields = fields
        self.names = tuple(f.name for f in fields)
        self.by_name = {f.name: f for f in fields}
        self.compared = tuple(f.name for f in fields if f.compare)
        self.hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))
        self.frozen = frozen
        self.post_init = hasattr(cls, "__post_init__")
        self.calls = 0
        self.shared: tuple[str, ...] = ()  # the shared ==, hash and order methods it was given


def _build(cls: type, frozen: bool, order: bool) -> None:
    for base in cls.__mro__[1:]:
        if "__record_spec__" in base.__dict__ or "__dataclass_fields__" in base.__dict__:
            raise TypeError(f"{cls.__qualname__}: a record cannot inherit from {base.__qualname__}")
    own = cls.__dict__
    # As dataclass(eq=True): frozen hashes the compared fields, mutable is unhashable, unless the
    # class body set __hash__ itself (a body that defines __eq__ gets __hash__ = None from Python).
    explicit_hash = own.get("__hash__", MISSING)
    keep_hash = not (explicit_hash is MISSING or (explicit_hash is None and "__eq__" in own))
    spec = _Spec(cls, _collect_fields(cls), frozen)
    compared = _getter(spec.compared)

    made: dict[str, Any] = {
        "__repr__": _repr_fn(tuple(f.name for f in spec.fields if f.repr)),
        "__eq__": _eq_fn(compared),
    }
    if order:
        made.update(_order_fns(compared))
    if not keep_hash:
        made["__hash__"] = _hash_fn(_getter(spec.hashed)) if frozen else None
    for name, fn in made.items():
        if name not in own or name == "__hash__":  # as dataclass: a method the body defines is kept
            if fn is not None:
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
                if name != "__repr__":
                    spec.shared += (name,)
            type.__setattr__(cls, name, fn)
    if frozen:
        for name, guard in (("__setattr__", _frozen_setattr), ("__delattr__", _frozen_delattr)):
            if name in own:
                raise TypeError(f"{cls.__qualname__}: a frozen record cannot define {name}")
            type.__setattr__(cls, name, guard)
    if "__init__" not in own:
        type.__setattr__(cls, "__init__", _generic_init)
    if "__match_args__" not in own:
        type.__setattr__(cls, "__match_args__", spec.names)
    type.__setattr__(cls, "__record_spec__", spec)
    type.__setattr__(cls, "__dataclass_fields__", _DataclassFields(spec))


def _collect_fields(cls: type) -> tuple[Field, ...]:
    fields = []
    seen_default = False
    for name, kind in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063 (inspect costs 4 ms)
        # A string under `from __future__ import annotations`; a quoted one is quoted once more.
        text = kind.strip("'\"") if isinstance(kind, str) else getattr(kind, "__name__", "")
        if text.startswith(("InitVar", "dataclasses.InitVar")):
            raise TypeError(f"{cls.__qualname__}.{name}: records do not support InitVar")
        if text.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = cls.__dict__.get(name, MISSING)
        if type(value).__name__ == "Field" and type(value).__module__ == "dataclasses":
            raise TypeError(f"{cls.__qualname__}.{name}: use gpu_router.records.field in a record")
        f = value if isinstance(value, Field) else Field(value, MISSING, True, None, True)
        if f.default is not MISSING and type(f.default).__hash__ is None:
            raise ValueError(
                f"mutable default {type(f.default)} for field {name} is not allowed: use default_factory"
            )
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        if seen_default and not has_default:
            raise TypeError(f"non-default argument {name!r} follows default argument")
        seen_default = seen_default or has_default
        f.name, f.type = name, kind
        # As dataclass does: the class attribute is the plain default, or absent.
        if isinstance(value, Field):
            if f.default is MISSING:
                type.__delattr__(cls, name)
            else:
                type.__setattr__(cls, name, f.default)
        fields.append(f)
    return tuple(fields)


def _spec(obj: object) -> _Spec:
    spec = getattr(obj, "__record_spec__", None)
    if not isinstance(spec, _Spec):
        raise TypeError(f"{obj!r} is not a record or a record class")
    return spec


def is_record(obj: object) -> bool:
    """Whether `obj` is a record class or an instance of one."""
    return isinstance(getattr(obj, "__record_spec__", None), _Spec)


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record class or instance, in order."""
    return _spec(obj).fields


def field_names(obj: object) -> tuple[str, ...] | None:
    """The field names of a record class or instance, in order; None for anything else."""
    spec = getattr(obj, "__record_spec__", None)
    return spec.names if isinstance(spec, _Spec) else None


if not TYPE_CHECKING:

    def replace(obj, /, **changes):
        """A copy of record `obj` with `changes` (field name to value)."""
        for name in _spec(obj).names:
            if name not in changes:
                changes[name] = getattr(obj, name)
        return obj.__class__(**changes)


def asdict(obj: object) -> dict[str, Any]:
    """Record `obj` as a dict, records inside it too (through tuples, lists and dicts); other values as is."""
    return {name: _plain(getattr(obj, name)) for name in _spec(obj).names}


def _plain(value: object) -> Any:
    if is_record(value):
        return asdict(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple takes its fields apart
        return type(value)(*(_plain(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------- __init__


def _generic_init(self: Any, *args: Any, **kwargs: Any) -> None:
    spec: _Spec = self.__record_spec__
    spec.calls += 1  # a lost count under threads only delays the compile
    if spec.calls > COMPILE_AFTER and spec.cls.__dict__.get("__init__") is _generic_init:
        # A class built this often is a hot one: compile its ==, hash and ordering too, which as
        # shared functions take 2.5 times as long (attrgetter has no attribute caches).
        methods = _compile(spec)
        for name, fn in methods.items():
            type.__setattr__(spec.cls, name, fn)
        methods["__init__"](self, *args, **kwargs)
        return
    names = spec.names
    if len(args) > len(names):
        required = sum(f.default is MISSING and f.default_factory is MISSING for f in spec.fields)
        takes = f"{len(names) + 1}" if required == len(names) else f"from {required + 1} to {len(names) + 1}"
        raise TypeError(
            f"{spec.cls.__qualname__}.__init__() takes {takes} positional arguments "
            f"but {len(args) + 1} were given"
        )
    values = dict(zip(names, args, strict=False))  # fewer args than names is fine
    for name, value in kwargs.items():
        if name not in spec.by_name:
            raise TypeError(f"{spec.cls.__qualname__}.__init__() got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"{spec.cls.__qualname__}.__init__() got multiple values for argument {name!r}")
        values[name] = value
    missing = []
    put = object.__setattr__ if spec.frozen else setattr
    for f in spec.fields:
        name = f.name
        if name in values:
            value = values[name]
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            missing.append(name)
            continue
        put(self, name, value)
    if missing:
        quoted = [repr(name) for name in missing]  # worded as CPython words it
        head, last = ", ".join(quoted[:-1]), quoted[-1]
        listed = last if not head else f"{head}{',' if len(quoted) > 2 else ''} and {last}"
        raise TypeError(
            f"{spec.cls.__qualname__}.__init__() missing {len(missing)} required positional "
            f"argument{'s' if len(missing) > 1 else ''}: {listed}"
        )
    if spec.post_init:
        self.__post_init__()


def _compile(spec: _Spec) -> dict[str, Callable[..., Any]]:
    """The class's own `__init__` and comparisons, written and compiled as dataclass writes them."""
    env: dict[str, Any] = {"__rec_set": object.__setattr__, "__rec_missing": MISSING}
    params, body = [], []
    for f in spec.fields:
        name = f.name
        value = name
        if f.default_factory is not MISSING:
            env[f"__rec_factory_{name}"] = f.default_factory
            params.append(f"{name}=__rec_missing")
            value = f"__rec_factory_{name}() if {name} is __rec_missing else {name}"
        elif f.default is not MISSING:
            env[f"__rec_default_{name}"] = f.default
            params.append(f"{name}=__rec_default_{name}")
        else:
            params.append(name)
        if spec.frozen:
            body.append(f"    __rec_set(__rec_self, {name!r}, {value})")
        else:
            body.append(f"    __rec_self.{name} = {value}")
    if spec.post_init:
        body.append("    __rec_self.__post_init__()")
    text = [f"def __init__(__rec_self, {', '.join(params)}):", *(body or ["    pass"])]

    def fields_of(obj: str, names: tuple[str, ...]) -> str:
        return "(" + "".join(f"{obj}.{name}," for name in names) + ")"

    mine, theirs = fields_of("self", spec.compared), fields_of("other", spec.compared)
    for name in spec.shared:
        if name == "__hash__":
            text += ["def __hash__(self):", f"    return hash({fields_of('self', spec.hashed)})"]
            continue
        text += [
            f"def {name}(self, other):",
            "    if other.__class__ is self.__class__:",
            f"        return {mine} {_OPERATORS[name]} {theirs}",
            "    return NotImplemented",
        ]
    cls = spec.cls
    exec(compile("\n".join(text) + "\n", f"<record {cls.__module__}.{cls.__qualname__}>", "exec"), env)  # noqa: S102
    made = {}
    for name in ("__init__", *spec.shared):
        fn = env[name]
        fn.__qualname__ = f"{cls.__qualname__}.{name}"
        fn.__module__ = cls.__module__
        made[name] = fn
    return made


_OPERATORS: Final = {"__eq__": "==", "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">="}


# --------------------------------------------------------------------------- shared methods


def _getter(names: tuple[str, ...]) -> _Getter:
    # Compare and hash tuples, as the generated methods do (attrgetter of one name gives the value).
    if not names:
        return lambda _: ()
    if len(names) == 1:
        get = attrgetter(names[0])
        return lambda obj: (get(obj),)
    return attrgetter(*names)


def _repr_fn(names: tuple[str, ...]) -> Callable[[Any], str]:
    def __repr__(self: Any) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__qualname__}({shown})"

    return __repr__


def _eq_fn(key: _Getter) -> Callable[[Any, object], Any]:
    def __eq__(self: Any, other: object) -> Any:
        if other.__class__ is self.__class__:
            return key(self) == key(other)
        return NotImplemented

    return __eq__


def _hash_fn(key: _Getter) -> Callable[[Any], int]:
    def __hash__(self: Any) -> int:
        return hash(key(self))

    return __hash__


def _order_fns(key: _Getter) -> dict[str, Callable[[Any, object], Any]]:
    def __lt__(self: Any, other: object) -> Any:
        return key(self) < key(other) if other.__class__ is self.__class__ else NotImplemented

    def __le__(self: Any, other: object) -> Any:
        return key(self) <= key(other) if other.__class__ is self.__class__ else NotImplemented

    def __gt__(self: Any, other: object) -> Any:
        return key(self) > key(other) if other.__class__ is self.__class__ else NotImplemented

    def __ge__(self: Any, other: object) -> Any:
        return key(self) >= key(other) if other.__class__ is self.__class__ else NotImplemented

    return {"__lt__": __lt__, "__le__": __le__, "__gt__": __gt__, "__ge__": __ge__}


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    from dataclasses import FrozenInstanceError

    raise FrozenInstanceError(f"cannot delete field {name!r}")


# ------------------------------------------------------------------ dataclasses compatibility


class _DataclassFields:
    """A record's `__dataclass_fields__`, made on first use by `dataclasses.fields()` and co."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec

    def __get__(self, obj: object, owner: type) -> dict[str, Any]:
        import dataclasses

        mark = getattr(dataclasses, "_FIELD")  # noqa: B009 (fields() keeps fields with this mark; since 3.7)
        made = {}
        for f in self.spec.fields:
            df: Any = dataclasses.field(
                default=dataclasses.MISSING if f.default is MISSING else f.default,
                default_factory=(dataclasses.MISSING if f.default_factory is MISSING else f.default_factory),
                repr=f.repr,
                hash=f.hash,
                compare=f.compare,
            )
            df.name, df.type, df._field_type = f.name, f.type, mark
            made[f.name] = df
        type.__setattr__(owner, "__dataclass_fields__", made)
        return made
