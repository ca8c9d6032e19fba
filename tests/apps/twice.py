"""An app module that registers one task name twice: the worker's one-line error must
name this module's line, not pgqueue's (tests/test_daemons.py)."""

from pgqueue import Registry

registry = Registry()


@registry.task(name="twice")
def first() -> None: ...


# The second registration below must stay on line 14.
@registry.task(name="twice")
def second() -> None: ...
