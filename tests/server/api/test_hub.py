"""The hub's live output of a job (what GET /v1/jobs/{id} shows while it runs): one run's output.
A job that goes back to the queue (its replica or worker died, the server stopped) runs again from
the start and prints everything again; the store keeps only that rerun's output."""

from __future__ import annotations

from glassbox.server.api.hub import Hub


def test_a_job_back_in_the_queue_starts_its_live_output_afresh():
    hub = Hub(store=None)
    hub.publish("j", {"status": "RUNNING", "log": "looping\n", "offset": 0})
    hub.publish("j", {"status": "RUNNING", "note": "loading m"})
    assert (hub.live_logs("j"), hub.note("j")) == ("looping\n", "loading m")
    hub.publish("j", {"status": "QUEUED", "position": 0})  # its process died: it runs once more
    assert (hub.live_logs("j"), hub.note("j")) == (None, None)
    hub.publish("j", {"status": "RUNNING"})
    hub.publish("j", {"status": "RUNNING", "log": "looping\n", "offset": 0})
    assert hub.live_logs("j") == "looping\n"  # not the first run's output as well
    hub.publish("j", {"status": "COMPLETED"})
    assert hub.live_logs("j") is None
