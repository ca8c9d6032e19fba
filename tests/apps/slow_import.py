"""The sample app, imported slowly (SLOW_IMPORT_SECONDS, default 2): a worker process
stays in its start-up for that long, for tests that signal it there."""

import os
import time

time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", "2")))

from tests.apps.sample import registry  # noqa: E402

__all__ = ["registry"]
