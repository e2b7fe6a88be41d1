"""The dashboard at ``/`` in headless Chromium, against a real server (tiny GPT-2).

The page asks for a key and keeps it out of URLs; a user's job appears live with its output
(shown as text, never HTML) and its result size; an operator's page shows the numbers
``/v1/dashboard`` and ``/v1/models`` give; a user sees neither other users' jobs nor operator data,
on the page or in the JSON. Each page is saved as a screenshot under the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator

import httpx
import pytest

from glassbox.cli import main, start_server
from glassbox.remote import transport
from job_requests import job_request
from waiting import HANG, REQUEST
from waiting import wait_until as wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ECHO = "h = glassbox_model.transformer.h[1].output.save()\necho = glassbox.save(marker)\n"
FOREVER = "n = 0\nwhile True:\n    n = n + 1\n"
HOSTILE = '<b id="injected">bold</b><img src=x onerror="document.title=\'pwned\'">'



def submit(server, key: str, source: str, marker: str = "m") -> str:
    request = job_request(source, values={"marker": marker}, inputs=["The Eiffel Tower is in"], model_refs={},
                          modules={"glassbox": "glassbox"}, returns=("echo", "h"), filename="<remote block>")
    return transport.submit(server.url, key, request, timeout=REQUEST)


def wait_until(condition: Callable[[], object], what: str) -> object:
    """The condition's first truthy value, however long a busy machine takes to render it (a limit
    only stops a hang); the page re-renders every second, so a read may meet a node that was just
    replaced (retried)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    return wait_for(condition, what, interval=0.1,
                    retry=(NoSuchElementException, StaleElementReferenceException))


def dashboard(server, key: str) -> dict:
    response = httpx.get(server.url + "/v1/dashboard", headers={"X-API-Key": key}, timeout=REQUEST)
    assert response.status_code == 200, response.text
    return response.json()


# One read of a whole table in the page (one script call, so one render): rows of {column: text},
# with "<column>@title" for cells that carry an exact number as their title and "_id" for jobs.
_ROWS = """
const table = document.getElementById(arguments[0]);
if (!table) { return null; }
return Array.from(table.tBodies[0].rows).map(tr => {
  const row = {_id: tr.dataset.jobId || null};
  for (const td of tr.cells) {
    row[td.dataset.col] = td.textContent;
    if (td.title) { row[td.dataset.col + "@title"] = td.title; }
  }
  return row;
});
"""


def rows(driver, table_id: str) -> list[dict] | None:
    return driver.execute_script(_ROWS, table_id)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    from glassbox.offline import tiny_gpt2_path

    state = tmp_path_factory.mktemp("dashboard-server")
    running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=str(state), args=[
        "--max-seconds", str(HANG), "--torch-threads", "1",  # FOREVER jobs end when cancelled
        "--max-batch", "1",  # one job at a time, so that jobs wait in the queue the operator sees
    ])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    # The operator key as the docs make it (docs/dashboard.md), in this process: a second Python
    # that imports torch costs seconds.
    def cli(*args: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["keys", *args, "--state-dir", server.state_dir]) == 0
        return out.getvalue()

    made = {"ops": cli("create", "ops", "--operator").strip(), "alice": cli("create", "alice").strip(),
            "bob": cli("create", "--name", "bob").strip()}
    roles = {line.split()[1]: line.split()[2] for line in cli("list").splitlines()[1:]}
    assert roles == {"ops": "operator", "alice": "user", "bob": "user"}
    return made


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver, "
                    "see scripts/setup_system.sh)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the tests drive Chromium with selenium")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, server, key: str, name: str) -> None:
    """Load the page in a fresh tab state and log in through its form, as a person would."""
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear();")
    driver.get(server.url + "/")
    field = wait_until(lambda: driver.find_element(By.ID, "key-input"), "the key form")
    assert field.is_displayed()
    field.send_keys(key)
    driver.find_element(By.ID, "key-submit").click()
    wait_until(lambda: name in driver.find_element(By.ID, "who").text, f"the page to show key {name!r}")
    assert key not in driver.current_url


def shot(driver, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    target = os.environ.get("GLASSBOX_SCREENSHOTS")  # where a person collects them, if set
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(path, target)


# ---------------------------------------------------------------- tests


def test_the_page_asks_for_a_key_and_keeps_it_in_the_tab(browser, server, keys, tmp_path):
    from selenium.webdriver.common.by import By

    response = httpx.get(server.url + "/", timeout=REQUEST)
    assert response.status_code == 200 and "glassbox dashboard" in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert httpx.get(server.url + "/v1/dashboard", timeout=REQUEST).status_code == 401
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear();")
    browser.get(server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "key-form").is_displayed(), "the key form")
    browser.find_element(By.ID, "key-input").send_keys("gbx_not_a_key")
    browser.find_element(By.ID, "key-submit").click()
    wait_until(lambda: "rejected" in browser.find_element(By.ID, "key-error").text, "the rejection")
    shot(browser, tmp_path, "login")
    open_page(browser, server, keys["alice"], "alice")
    assert browser.execute_script("return sessionStorage.getItem('glassbox.apiKey')") == keys["alice"]
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    # A proxy that adds the key header gets the page without the form, and the key is not in it.
    proxied = httpx.get(server.url + "/", headers={"X-API-Key": keys["alice"]}, timeout=REQUEST).text
    assert 'data-auth="header"' in proxied and keys["alice"] not in proxied
    assert 'data-auth="form"' in httpx.get(server.url + "/", headers={"X-API-Key": "gbx_no"},
                                           timeout=REQUEST).text


def test_a_users_job_appears_live_with_its_output_as_text_and_result_size(browser, server, keys, tmp_path):
    from selenium.webdriver.common.by import By

    alice = keys["alice"]
    open_page(browser, server, alice, "alice")
    title = browser.title
    # Submitted while the page is open: it prints, then runs until it is cancelled (once the page
    # has shown it running, however long a busy machine takes for that: no time limit races it).
    running = submit(server, alice, f"print({HOSTILE!r})\n" + FOREVER)

    def shown(job: str) -> dict | None:
        return next((row for row in rows(browser, "jobs-table") or [] if row["_id"] == job), None)

    wait_until(lambda: (shown(running) or {}).get("status") == "RUNNING", "the new job, RUNNING")
    browser.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{running}"]').click()
    wait_until(lambda: "bold" in browser.find_element(By.ID, "logs").text, "its output while it runs")
    logs = browser.find_element(By.ID, "logs")
    assert logs.text.strip() == HOSTILE  # shown as text: no element was made from it, nothing ran
    assert browser.find_elements(By.ID, "injected") == [] and browser.title == title
    transport.cancel(server.url, alice, running)
    ended = wait_until(lambda: (shown(running) or {}).get("status") == "CANCELLED" and shown(running),
                       "the job's end, CANCELLED")
    [mine] = [job for job in dashboard(server, alice)["jobs"] if job["id"] == running]
    assert ended["error"] == mine["error"] and mine["error"].startswith("Cancelled: ")
    wait_until(lambda: mine["error"] in browser.find_element(By.ID, "log-error").text, "the error line")

    done = submit(server, alice, ECHO, "alice-values")
    row = wait_until(lambda: (shown(done) or {}).get("status") == "COMPLETED" and shown(done),
                     "the second job, COMPLETED")
    [api] = [job for job in dashboard(server, alice)["jobs"] if job["id"] == done]
    fetched = httpx.get(f"{server.url}/v1/jobs/{done}/result", headers={"X-API-Key": alice}, timeout=REQUEST)
    assert api["result_bytes"] == len(fetched.content) > 0
    assert row["result_bytes@title"] == f"{api['result_bytes']:,} bytes"
    assert row["model"] == "gpt2" and row["log_length"] == "0 chars"
    shot(browser, tmp_path, "user")


def test_the_operator_page_shows_the_numbers_of_the_api(browser, server, keys, tmp_path):
    ops, alice, bob = keys["ops"], keys["alice"], keys["bob"]
    open_page(browser, server, ops, "ops")
    blocker = submit(server, bob, "print('bob-private-output')\n" + FOREVER)
    waiting = [submit(server, bob, ECHO, "b"), submit(server, alice, ECHO, "a")]

    def same_as_api() -> dict | None:
        # Both sides are live: compare one render of the page with the JSON right after it.
        page = {name: rows(browser, f"{name}-table") for name in ("queue", "running", "models", "replicas")}
        api = dashboard(server, ops)["operator"]
        queue = [(r["id"], r["position"], r["owner"]) for r in page["queue"] or []]
        running = [(r["id"], r["owner"]) for r in page["running"] or []]
        if not running or running != [(j["id"], j["owner"]) for j in api["running"]]:
            return None
        return {"page": page, "api": api} if queue == [(j["id"], str(j["position"]), j["owner"])
                                                       for j in api["queue"]] else None

    seen = wait_until(same_as_api, "the queue and running jobs on the page to match /v1/dashboard")
    page, api = seen["page"], seen["api"]
    assert [r["id"] for r in page["running"]] == [blocker]
    assert page["running"][0]["owner"] == "bob"
    assert [(r["id"], r["owner"]) for r in page["queue"]] == list(zip(waiting, ["bob", "alice"]))
    # Models: the /v1/models answer, column by column.
    served = transport.models(server.url, ops)  # with a key: a loaded model's description too
    assert [m["name"] for m in served] == [r["name"] for r in page["models"]] == ["gpt2"]
    assert page["models"][0]["parameters"] == f"{served[0]['parameters']:,}"
    assert page["models"][0]["replicas"] == str(served[0]["replicas"])
    [replica] = api["replicas"]
    [shown] = page["replicas"]
    assert shown["pid"] == str(replica["pid"]) and shown["state"] == replica["state"] == "ready"
    assert shown["restarts"] == str(replica["restarts"]) and shown["label"] == replica["label"]
    health = httpx.get(server.url + "/v1/health", headers={"X-API-Key": ops}, timeout=REQUEST).json()
    assert [r["pid"] for r in health["replicas"]] == [replica["pid"]]
    totals = browser.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#totals dd'))"
        ".map(dd => [dd.dataset.total, dd.textContent]))")
    assert totals["keys"] == str(api["totals"]["keys"]) == "3" and totals["backend"] == "local"
    stats = browser.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#batching dd'))"
        ".map(dd => [dd.dataset.stat, dd.textContent]))")
    assert stats["max_batch"] == "1" and stats["batches"] == str(api["batching"]["batches"])
    # Other tenants appear by name and status only: no output, code or values in the JSON or page.
    wait_until(lambda: "bob-private-output" in (transport.status(server.url, bob, blocker)["logs"] or ""),
               "bob's job to print")
    text = json.dumps(dashboard(server, ops)) + browser.page_source
    for secret in ("bob-private-output", "while True", bob, alice):
        assert secret not in text
    shot(browser, tmp_path, "operator")
    transport.cancel(server.url, bob, blocker)
    for job, key in zip(waiting, (bob, alice)):
        list(transport.events(server.url, key, job, timeout=HANG))

    def finished() -> dict:
        shown = {r["id"]: r["status"] for r in rows(browser, "recent-table") or []}
        return {job: shown.get(job) for job in (blocker, *waiting)}

    wait_until(lambda: finished() == {blocker: "CANCELLED", waiting[0]: "COMPLETED", waiting[1]: "COMPLETED"},
               "the three jobs among the recently finished ones")


def test_a_user_sees_no_other_users_jobs_and_no_operator_data(browser, server, keys, tmp_path):
    from selenium.webdriver.common.by import By

    alice, bob = keys["alice"], keys["bob"]
    theirs = submit(server, alice, "print('alice-only')\n" + ECHO, "alice-values")
    mine = submit(server, bob, ECHO, "bob-values")
    for job, key in ((theirs, alice), (mine, bob)):
        list(transport.events(server.url, key, job, timeout=HANG))
    alice_jobs = [job["id"] for job in dashboard(server, alice)["jobs"]]
    assert theirs in alice_jobs

    view = dashboard(server, bob)
    assert view["role"] == "user" and "operator" not in view
    assert mine in [job["id"] for job in view["jobs"]]
    text = json.dumps(view)
    assert not any(job in text for job in alice_jobs) and "alice" not in text
    refused = httpx.get(f"{server.url}/v1/jobs/{theirs}", headers={"X-API-Key": bob}, timeout=REQUEST)
    assert refused.status_code == 404

    open_page(browser, server, bob, "bob")
    wait_until(lambda: mine in [r["_id"] for r in rows(browser, "jobs-table") or []], "bob's job")
    source = browser.page_source
    assert not any(job in source for job in alice_jobs)
    assert "alice" not in source and "alice-only" not in source
    assert browser.find_element(By.ID, "operator").get_attribute("childElementCount") == "0"
    assert rows(browser, "queue-table") is None and rows(browser, "replicas-table") is None
    assert "user" in browser.find_element(By.ID, "who").text
    shot(browser, tmp_path, "user-bob")


def test_a_database_from_before_operator_keys_gets_the_column(tmp_path):
    import sqlite3

    from glassbox.server.store import JobStore, hash_key

    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as old:  # the api_keys table as it was
        old.execute("CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, name VARCHAR(200), "
                    "key_hash VARCHAR(64) UNIQUE, created FLOAT, revoked FLOAT)")
        old.execute("INSERT INTO api_keys VALUES ('k1', 'old-user', ?, 1.0, NULL)", (hash_key("gbx_old"),))
        old.commit()
    store = JobStore(f"sqlite:///{path}")
    try:
        assert store.authenticate("gbx_old").operator is False
        info, key = store.create_key("new-ops", operator=True)
        assert info.operator and store.authenticate(key).operator
    finally:
        store.close()
    store = JobStore(f"sqlite:///{path}")  # opening it again changes nothing
    try:
        assert [(k.name, k.operator) for k in store.list_keys()] == [("old-user", False), ("new-ops", True)]
    finally:
        store.close()


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Iterator:
    """A server whose on-demand loads wait until the test lets them go on (gated_executor.py)."""
    from gated_executor import gated_servers

    with gated_servers(tmp_path_factory.mktemp("dashboard-gated"),
                       {"gpt2": "eager", "late": "on_demand"}) as (gate, [server]):
        yield gate, server


def test_a_loading_jobs_note_and_a_queued_jobs_estimated_start_are_on_the_page(browser, gated, tmp_path):
    from glassbox.server.config import ServerConfig
    from glassbox.server.store import JobStore

    gate, server = gated
    alice = server.create_key("alice")
    store = JobStore(ServerConfig(state_dir=server.state_dir).database_url())
    try:
        ops = store.create_key("ops", operator=True)[1]
    finally:
        store.close()
    history = submit(server, alice, ECHO, "history")  # a finished gpt2 job: what estimates come from
    # (the late job ahead has no history of its own: it counts as a typical gpt2 job)
    list(transport.events(server.url, alice, history, timeout=HANG))
    open_page(browser, server, alice, "alice")
    late = transport.submit(server.url, alice, job_request(
        ECHO, model="late", values={"marker": "late"}, inputs=["The Eiffel Tower is in"], model_refs={},
        modules={"glassbox": "glassbox"}, returns=("echo", "h"), filename="<remote block>"), timeout=REQUEST)
    waiting = submit(server, alice, ECHO, "w")

    def shown(job: str) -> dict | None:
        return next((row for row in rows(browser, "jobs-table") or [] if row["_id"] == job), None)

    def same_as_api() -> dict | None:
        # One render of the page against the JSON right after it (both live).
        page = {job: shown(job) for job in (late, waiting)}
        api = {job["id"]: job for job in dashboard(server, alice)["jobs"]}
        if not all(page.values()) or page[late]["status"] != "RUNNING" or page[waiting]["status"] != "QUEUED":
            return None
        estimate = api[waiting]["estimated_start_seconds"]
        if api[late]["note"] != "loading late" or page[late]["note"] != "loading late" or estimate is None:
            return None
        shown_estimate = page[waiting]["estimated_start_seconds"]
        # The page rounds to tenths as JavaScript does; the API has hundredths.
        if not shown_estimate.startswith("~") or abs(float(shown_estimate[1:-2]) - estimate) > 0.051:
            return None
        return {"page": page, "api": api}

    seen = wait_until(same_as_api, "the note and the estimated start on the page")
    assert seen["page"][waiting]["estimated_start_seconds@title"].startswith("estimated from the run times")
    assert seen["page"][waiting]["note"] == "" and seen["page"][late]["estimated_start_seconds"] == "-"
    operator = dashboard(server, ops)["operator"]
    assert [(job["id"], job["note"]) for job in operator["running"]] == [(late, "loading late")]
    assert [job["id"] for job in operator["queue"]] == [waiting]
    assert isinstance(operator["queue"][0]["estimated_start_seconds"], float)
    shot(browser, tmp_path, "loading")
    (gate / "late").touch()
    for job in (late, waiting):
        list(transport.events(server.url, alice, job, timeout=HANG))
    wait_until(lambda: (shown(late) or {}).get("status") == "COMPLETED" and shown(late)["note"] == "",
               "the loaded job's end, its note gone")
