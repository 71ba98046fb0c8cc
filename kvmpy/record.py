"""Records: the core library's small value classes (fields, ``__init__``, repr, equality).

The layers every kvmpy process imports (the kernel objects, x86 setup, the guest runtime,
``kvmpy perf``) make them with :class:`Record` rather than :mod:`dataclasses`: importing that
module (it imports inspect, ast, dis and tokenize) and its six generated functions per class
were a third of a process's start-up, the whole of ``kvmpy perf dirty-log``'s excess over the
kernel's C tool (issue 16). A record class gets one generated ``__init__``, as fast per object
as a dataclass's, and shares the rest. The harness (bed, report) keeps dataclasses: it uses
``asdict``/``fields``/``__post_init__`` and is imported only by the commands that need it.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:                                       # type checkers only; nothing to do at run time
    def dataclass_transform(**_kwargs: Any) -> Callable:
        return lambda cls: cls

R = TypeVar("R", bound="Record")


class Factory:
    """A field default made anew for each object: ``syncs: list = Factory(list)``."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        if not callable(make):
            raise TypeError(f"Factory needs a callable, not {make!r}")
        self.make = make

    def __repr__(self) -> str:
        return f"Factory({getattr(self.make, '__qualname__', self.make)!s})"


class FrozenRecordError(AttributeError):
    """Assignment to (or deletion of) a field of a frozen record."""


def _refuse_setattr(self: Record, name: str, value: object) -> None:
    raise FrozenRecordError(f"{type(self).__qualname__} is frozen: cannot assign to {name!r}")


def _refuse_delattr(self: Record, name: str) -> None:
    raise FrozenRecordError(f"{type(self).__qualname__} is frozen: cannot delete {name!r}")


@dataclass_transform(field_specifiers=(Factory,))
class Record:
    """Base of a record class. Its fields are the names annotated in it and its record bases,
    bases' first; a class attribute of the same name is the field's default (a
    :class:`Factory` for one made per object). Keywords: ``frozen=True`` refuses assignment
    after ``__init__`` and makes the record hashable by its fields; a mutable record is
    unhashable, as it compares equal by value. A class that writes its own ``__init__``
    keeps it; ``__post_init__`` is called after a generated one.
    """

    __slots__ = ()
    _record_fields: tuple[str, ...] = ()
    _record_frozen = False

    def __init_subclass__(cls, frozen: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base_frozen = cls._record_frozen
        if frozen is None:
            frozen = base_frozen
        elif cls._record_fields and frozen != base_frozen:
            raise TypeError(f"{cls.__qualname__}: cannot change frozen={base_frozen} of its base")
        own = tuple(cls.__dict__.get("__annotations__", {}))
        cls._record_fields = cls._record_fields + tuple(n for n in own if n not in cls._record_fields)
        cls._record_frozen = frozen
        if frozen:
            cls.__setattr__ = _refuse_setattr
            cls.__delattr__ = _refuse_delattr
        if "__eq__" not in cls.__dict__ and "__hash__" not in cls.__dict__:
            cls.__hash__ = Record._hash if frozen else None      # type: ignore[assignment]
        if own and "__init__" not in cls.__dict__:
            cls.__init__ = _make_init(cls)                        # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self._record_fields) + ")"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._record_fields)

    def _hash(self) -> int:
        return hash(tuple(getattr(self, n) for n in self._record_fields))


def _make_init(cls: type) -> Callable:
    """``__init__(self, <fields>)`` for ``cls``: one exec, so it runs as fast as hand-written."""
    params, body, env = [], [], {"_object_setattr": object.__setattr__}
    seen_default = None
    for n in cls._record_fields:
        default = _default(cls, n)
        if default is _NO_DEFAULT:
            if seen_default is not None:
                raise TypeError(f"{cls.__qualname__}: field {n!r} without a default follows {seen_default!r}, "
                                f"which has one")
            params.append(n)
            value = n
        else:
            seen_default = n
            env[f"_default_{n}"] = default
            params.append(f"{n}=_default_{n}")
            value = f"_default_{n}.make() if {n} is _default_{n} else {n}" if isinstance(default, Factory) else n
        body.append(f"_object_setattr(self, {n!r}, {value})" if cls._record_frozen else f"self.{n} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    src = f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body) + "\n"
    exec(src, env)                                              # noqa: S102 - names are identifiers
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return init


_NO_DEFAULT = object()


def _default(cls: type, name: str) -> object:
    """The default of field ``name`` given by the class that annotates it last (a subclass may
    redeclare a field to change its default)."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dict__.get(name, _NO_DEFAULT)
    return _NO_DEFAULT


def replace(record: R, **changes: Any) -> R:
    """A copy of ``record`` with ``changes`` to its fields (TypeError for a name that is not one)."""
    unknown = sorted(set(changes) - set(record._record_fields))
    if unknown:
        raise TypeError(f"{type(record).__qualname__} has no field {', '.join(map(repr, unknown))}")
    return type(record)(**{n: changes[n] if n in changes else getattr(record, n) for n in record._record_fields})
