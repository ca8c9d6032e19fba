"""An app whose registry has no tasks (they live in modules nothing imported): the worker
refuses to start rather than fail every job of its queues as an unknown task."""

from pgqueue import Registry

registry = Registry()
