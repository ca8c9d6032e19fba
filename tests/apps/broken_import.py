"""An app module whose own import fails (a dependency that is not installed): the
worker's one-line error must say where (tests/test_daemons.py)."""

# The failing import below must stay on line 5.
import pgqueue_test_no_such_dependency  # type: ignore[import-not-found]  # noqa: F401
