"""The fault-injection suite: real daemons, a throwaway Postgres, faults on a seeded schedule.

``python -m tests.faults.driver --help`` runs it by hand; ``make chaos`` runs the long
version; ``tests/faults/test_faults.py`` runs the short one in CI.
"""
