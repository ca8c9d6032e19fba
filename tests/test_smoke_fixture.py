from pgqueue import enqueue
from tests.conftest import scalar


def test_enqueue_roundtrip(conn):
    job_id = enqueue(conn, "record", {"note": "x"})
    assert scalar(conn, "SELECT task FROM pgqueue.jobs WHERE id = %s", (job_id,)) == "record"
