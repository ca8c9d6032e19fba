"""The sample app, which sets up standard-library logging itself at import."""

import logging
import sys

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="OWN %(name)s %(message)s")

from tests.apps.sample import registry  # noqa: E402

__all__ = ["registry"]
