"""kvmpy.record: the core library's value classes behave as the dataclasses they replaced."""
import copy
import inspect
import pickle
import subprocess
import sys

import pytest

from kvmpy.record import Factory, FrozenRecordError, Record, replace


class Point(Record, frozen=True):
    """A frozen record."""

    x: int
    y: int = 0


class Point3(Point):
    z: int = 0


class Bag(Record):
    """A mutable record with a per-object default."""

    items: list = Factory(list)
    count: int = 0


def test_fields_in_order_bases_first_with_defaults():
    assert Point3._record_fields == ("x", "y", "z")
    assert str(inspect.signature(Point3)) == "(x, y=0, z=0)"
    assert Point3(1, z=3) == Point3(x=1, y=0, z=3)


def test_repr_names_the_class_and_every_field():
    assert repr(Point3(1, 2, 3)) == "Point3(x=1, y=2, z=3)"
    assert repr(Bag()) == "Bag(items=[], count=0)"


def test_equality_is_by_class_and_value():
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(1, 3)
    assert Point(1) != Point3(1)            # a subclass is another type, as for dataclasses
    assert Point(1) != (1, 0)


def test_frozen_refuses_assignment_and_deletion_and_hashes_by_value():
    p = Point(1)
    with pytest.raises(FrozenRecordError, match="Point is frozen: cannot assign to 'x'"):
        p.x = 2
    with pytest.raises(AttributeError):
        del p.y
    assert p.x == 1
    assert {Point(1), Point(1), Point(2)} == {Point(1), Point(2)}


def test_mutable_record_is_unhashable_and_assignable():
    b = Bag()
    b.count = 3
    assert b.count == 3
    with pytest.raises(TypeError, match="unhashable"):
        hash(b)


def test_factory_default_is_made_per_object():
    a, b = Bag(), Bag()
    a.items.append(1)
    assert b.items == []
    assert Bag([5]).items == [5]
    with pytest.raises(TypeError, match="needs a callable"):
        Factory([])


def test_missing_and_unknown_arguments_are_type_errors():
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'x'"):
        Point()
    with pytest.raises(TypeError, match="unexpected keyword argument 'w'"):
        Point(1, w=2)


def test_field_without_default_after_one_with_is_refused():
    with pytest.raises(TypeError, match="field 'b' without a default follows 'a'"):
        class Bad(Record):
            a: int = 1
            b: int


def test_a_subclass_cannot_change_frozen():
    with pytest.raises(TypeError, match="cannot change frozen=True"):
        class Thawed(Point, frozen=False):
            pass


def test_replace_copies_with_changes_and_names_unknown_fields():
    p = Point3(1, 2, 3)
    assert replace(p, y=9) == Point3(1, 9, 3)
    assert p == Point3(1, 2, 3)
    with pytest.raises(TypeError, match="Point3 has no field 'w'"):
        replace(p, w=1)


def test_own_init_is_kept_and_post_init_runs_after_a_generated_one():
    class Own(Record):
        a: int

        def __init__(self, text: str) -> None:
            self.a = int(text)

    class Checked(Record):
        n: int

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("negative")

    assert Own("7").a == 7
    with pytest.raises(ValueError, match="negative"):
        Checked(-1)


def test_copy_and_pickle_keep_the_values():
    p = Point3(1, 2, 3)
    assert copy.copy(p) == p
    assert copy.deepcopy(Bag([1])) == Bag([1])
    assert pickle.loads(pickle.dumps(p)) == p


def test_the_core_library_does_not_import_dataclasses_itself():
    # Start-up cost (issue 16): kvmpy's own modules on every command's path make records.
    # (pyelftools' construct still imports it, through pprint, for `kvmpy perf`.)
    code = ("import sys, kvmpy, kvmpy.cli, kvmpy.guest.vcpu_loop, kvmpy.guest.ucall, kvmpy.perf.dirty_log;"
            "print(sorted(n for n, m in sys.modules.items() if n.startswith('kvmpy') and "
            "{'dataclass', 'dataclasses'} & set(vars(m))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
