"""Key names (pushsvc/keys.py): every one under its namespace, none shared by two uses."""

from __future__ import annotations

import inspect

import pytest

from pushsvc.keys import Keys


def every_name(keys: Keys) -> dict[str, str]:
    """Each key or channel name ``keys`` gives, by the method or property that gives it."""
    names: dict[str, str] = {}
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            names[name] = getattr(keys, name)
        elif inspect.isfunction(member):
            args = ["a"] * (len(inspect.signature(member).parameters) - 1)
            names[name] = getattr(keys, name)(*args)
    return names


@pytest.mark.timeout(10)
def test_every_name_is_under_the_namespace() -> None:
    names = every_name(Keys("ns1"))
    assert len(names) >= 15
    assert all(n.startswith("ns1:") for n in names.values()), names


@pytest.mark.timeout(10)
def test_no_two_uses_share_a_name() -> None:
    names = every_name(Keys("ns1"))
    assert len(set(names.values())) == len(names), names


@pytest.mark.timeout(10)
def test_namespaces_do_not_overlap() -> None:
    assert not set(every_name(Keys("a")).values()) & set(every_name(Keys("b")).values())
    assert Keys().queue == "pushsvc:queue"
    assert Keys("n").job("t", "j1") != Keys("n").job("t", "j2") != Keys("n").job("u", "j1")
