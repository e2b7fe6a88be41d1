"""``GET /metrics`` on a real server (``glassbox serve`` on loopback, SQLite and PostgreSQL).

Jobs of two keys on two models, then one scrape parsed as Prometheus parses it: jobs by model and
status, per-key usage under the key's name, the latency histograms, workers and models; only an
operator key may scrape; no job id, prompt, printed output or key is in the text.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glassbox.cli import start_server
from glassbox.remote import transport
from glassbox.remote.job import JobRequest
from glassbox.server.config import ServerConfig
from glassbox.server.store import JobStore, output_bytes
from job_requests import job_request
from waiting import REQUEST, wait_until

PROMPT = "The secret prompt of tenant alice is"
MARKER = "printed-by-alice-7f3a"
ECHO = f"print({MARKER!r})\necho = glassbox.save(marker)\n"
FAILS = "echo = glassbox.save(1 // 0)\n"


def _job(source: str, model: str) -> JobRequest:
    return job_request(source, model=model, values={"marker": "m"}, inputs=[PROMPT], model_refs={},
                       modules={"glassbox": "glassbox"}, returns=("echo",), filename="<remote block>")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(tmp_path_factory, request):
    from glassbox.offline import tiny_gpt2_path

    tiny = str(tiny_gpt2_path())
    database = []
    if request.param == "postgresql":
        database = ["--db-url", request.getfixturevalue("postgres").create_database("metrics")]
    state = tmp_path_factory.mktemp("metrics-server")
    running = start_server({"gpt2": tiny, "tiny": tiny}, state_dir=str(state),
                           args=[*database, "--torch-threads", "1"])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    store = JobStore(ServerConfig(state_dir=server.state_dir, db_url=server.db_url).database_url())
    try:
        return {"ops": store.create_key("ops", operator=True)[1], "alice": store.create_key("alice")[1],
                "bob": store.create_key("bob")[1]}
    finally:
        store.close()


def _scrape(server, key: str | None = None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.get(server.url + "/metrics", headers=headers, timeout=REQUEST)


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value}, read by Prometheus' own parser."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _scraped(server, key: str, timed: int) -> tuple[str, dict]:
    """A scrape once this process has timed ``timed`` finished jobs: a job is final in the store a
    moment before its feeder reports it."""
    def scraped() -> tuple[str, dict] | None:
        text = _scrape(server, key).text
        samples = _samples(text)
        seen = sum(value for (name, _), value in samples.items() if name == "glassbox_job_run_seconds_count")
        return (text, samples) if seen >= timed else None

    return wait_until(scraped, f"a scrape that has timed {timed} finished jobs")


def _wait_final(server, key: str, job: str) -> dict:
    def final() -> dict | None:
        state = transport.status(server.url, key, job)
        return state if state["status"] in transport.FINAL else None

    return wait_until(final, f"job {job} to finish")


def test_only_an_operator_key_may_scrape(server, keys):
    assert _scrape(server).status_code == 401
    assert _scrape(server, "gbx_not-a-key").status_code == 401
    # A tenant's key sees nothing of the others, not even totals.
    refused = _scrape(server, keys["alice"])
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    assert "glassbox_" not in refused.text
    answer = _scrape(server, **{"X-API-Key": keys["ops"]})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert {family.name for family in text_string_to_metric_families(answer.text)} >= {
        "glassbox_jobs", "glassbox_key_jobs", "glassbox_job_run_seconds", "glassbox_worker_restarts"}


def test_the_scrape_counts_what_happened(server, keys):
    submitted = [("alice", "gpt2", ECHO), ("alice", "gpt2", ECHO), ("bob", "tiny", ECHO),
                 ("bob", "gpt2", FAILS)]
    jobs = [(who, transport.submit(server.url, keys[who], _job(source, model), timeout=REQUEST))
            for who, model, source in submitted]
    finals = [_wait_final(server, keys[who], job) for who, job in jobs]
    assert [state["status"] for state in finals] == ["COMPLETED", "COMPLETED", "COMPLETED", "ERROR"]
    # What the quota counts: the framed results as their owners fetch them, errors, printed output.
    stored = {"alice": 0, "bob": 0}
    for (who, job), state in zip(jobs, finals):
        result = httpx.get(f"{server.url}/v1/jobs/{job}/result", headers={"X-API-Key": keys[who]},
                           timeout=REQUEST).content
        stored[who] += output_bytes(result, state["error"], state["logs"])

    text, samples = _scraped(server, keys["ops"], len(jobs))

    # Jobs by model and status (database-wide), and the same jobs timed by this process.
    assert _value(samples, "glassbox_jobs", model="gpt2", status="COMPLETED") == 2
    assert _value(samples, "glassbox_jobs", model="gpt2", status="ERROR") == 1
    assert _value(samples, "glassbox_jobs", model="tiny", status="COMPLETED") == 1
    assert _value(samples, "glassbox_jobs", model="tiny", status="QUEUED") == 0
    assert _value(samples, "glassbox_job_run_seconds_count", model="gpt2", status="COMPLETED") == 2
    assert _value(samples, "glassbox_job_run_seconds_count", model="gpt2", status="ERROR") == 1
    assert _value(samples, "glassbox_job_run_seconds_count", model="tiny", status="COMPLETED") == 1
    assert _value(samples, "glassbox_job_queue_wait_seconds_count", model="gpt2") == 3
    assert _value(samples, "glassbox_job_run_seconds_sum", model="gpt2", status="COMPLETED") > 0
    for model in ("gpt2", "tiny"):
        assert _value(samples, "glassbox_queue_length", model=model) == 0
        assert _value(samples, "glassbox_queue_oldest_wait_seconds", model=model) == 0
        assert _value(samples, "glassbox_model_state", model=model, state="ready") == 1
        assert _value(samples, "glassbox_model_parameters", model=model) > 0
        assert _value(samples, "glassbox_model_last_used_timestamp_seconds", model=model) > 0

    # Per-key usage under the names the operator gave the keys.
    assert _value(samples, "glassbox_key_jobs", key="alice", status="COMPLETED") == 2
    assert _value(samples, "glassbox_key_jobs", key="bob", status="COMPLETED") == 1
    assert _value(samples, "glassbox_key_jobs", key="bob", status="ERROR") == 1
    assert _value(samples, "glassbox_key_result_bytes", key="alice") == stored["alice"] > 0
    assert _value(samples, "glassbox_key_result_bytes", key="bob") == stored["bob"] > 0
    assert _value(samples, "glassbox_key_result_bytes", key="ops") == 0

    # The one local worker: ready, never restarted, its memory read from /proc.
    assert _value(samples, "glassbox_worker_state", worker="local", state="ready") == 1
    assert _value(samples, "glassbox_worker_restarts_total", worker="local") == 0
    assert _value(samples, "glassbox_worker_memory_bytes", worker="local") > 10 * 2**20
    batches = _value(samples, "glassbox_batches_total", worker="local")
    assert _value(samples, "glassbox_batched_jobs_total", worker="local") >= 2 * batches

    # Nothing of a tenant's: no job id, prompt, printed output, or key.
    for secret in [job for _, job in jobs] + [PROMPT, MARKER, *keys.values()]:
        assert secret not in text


def test_a_second_api_process_reports_the_same_store_and_its_own_jobs(server, keys, tmp_path):
    """Two API processes on one PostgreSQL database: the store's numbers are the same in both, the
    run-time histograms only count what each one ran (what docs/metrics.md says to max() / sum())."""
    if not server.db_url:
        pytest.skip("several API processes share a PostgreSQL database only")
    job = transport.submit(server.url, keys["alice"], _job(ECHO, "tiny"), timeout=REQUEST)
    assert _wait_final(server, keys["alice"], job)["status"] == "COMPLETED"
    from glassbox.offline import tiny_gpt2_path

    tiny = str(tiny_gpt2_path())
    other = start_server({"gpt2": tiny, "tiny": tiny}, state_dir=str(tmp_path),
                         args=["--db-url", server.db_url, "--torch-threads", "1"])
    try:
        _, first = _scraped(server, keys["ops"], 1)
        second = _samples(_scrape(other, keys["ops"]).text)
    finally:
        other.stop()

    def store_wide(samples: dict) -> dict:
        return {sample: value for sample, value in samples.items()
                if sample[0].startswith(("glassbox_jobs", "glassbox_key_", "glassbox_queue_"))}

    assert store_wide(first) == store_wide(second)
    assert _value(second, "glassbox_key_jobs", key="alice", status="COMPLETED") >= 1
    assert _value(first, "glassbox_job_run_seconds_count", model="tiny", status="COMPLETED") >= 1
    assert not any(value for (name, _), value in second.items() if name == "glassbox_job_run_seconds_count")
