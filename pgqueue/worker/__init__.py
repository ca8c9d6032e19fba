"""The worker daemon: listener, fetcher, executor, heartbeat and completer on one event loop.

See ``docs/worker.md`` for the states, the lease and fencing, and shutdown.
"""

from pgqueue.worker.daemon import Worker

__all__ = ["Worker"]
