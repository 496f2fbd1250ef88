"""The live console: its HTTP routes, and the page itself in a real headless Chromium.

The browser tests drive the system's Chromium (Debian's ``chromium`` package, or the path in
``TOKENTEE_CHROMIUM``) through Playwright; they never download a browser, and skip with the
reason when no Chromium is installed.  Each keeps a screenshot in ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from broker.service import Broker
from consumers.process import load_consumer_type
from tests.conftest import delete_prefix, make_settings, running_server
from tests.test_consumers import until

ARTIFACTS = Path(__file__).parent / "artifacts"
STATIC = Path(__file__).parent.parent / "broker" / "static"


def find_chromium() -> str | None:
    configured = os.environ.get("TOKENTEE_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


CHROMIUM = find_chromium()
_skip_without_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no system Chromium (install Debian's chromium package, or set TOKENTEE_CHROMIUM);"
    " Playwright is never allowed to download one",
)


def needs_chromium(test: Any) -> Any:
    """A browser test: skipped without Chromium, and given more time than the suite's
    default (a browser start on a loaded machine takes seconds)."""
    return pytest.mark.timeout(150)(_skip_without_chromium(test))


TOKEN = "console-test-token-0123456789"


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """Settings of the ``served`` server beyond the test defaults (overridden by tests)."""
    return {}


@pytest.fixture
def consumer_types() -> tuple[str, ...]:
    """The consumer types the ``served`` server runs (overridden by tests)."""
    return ("sentences", "analytics")


@pytest.fixture
async def served(
    redis_url: str, server_settings: dict[str, Any], consumer_types: tuple[str, ...]
) -> AsyncIterator[tuple[str, Broker]]:
    """A server with both built-in consumer types running, as ``tokentee serve`` has."""
    settings = make_settings(redis_url, sentences_sink="off", **server_settings)
    types = [load_consumer_type(name, settings) for name in consumer_types]
    try:
        async with Broker.open(settings, consumers=types) as b, running_server(
            settings, b
        ) as url:
            yield url, b
    finally:
        await delete_prefix(redis_url, settings.key_prefix)


@pytest.fixture
async def client(served: tuple[str, Broker]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served[0], timeout=httpx.Timeout(30.0)) as c:
        yield c


async def create(http: httpx.AsyncClient, **params: Any) -> str:
    response = await http.post("/v1/streams", json={"prompt": "hi", "params": params})
    assert response.status_code == 201, response.text
    gid: str = response.json()["id"]
    return gid


async def finish(http: httpx.AsyncClient, gid: str) -> None:
    async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/events") as source:
        async for sse in source.aiter_sse():
            if sse.event in ("done", "error", "cancelled"):
                return


async def sentence_events(
    http: httpx.AsyncClient, gid: str, headers: dict[str, str] | None = None
) -> list[ServerSentEvent]:
    out = []
    async with aconnect_sse(http, "GET", f"/v1/streams/{gid}/sentences/events",
                            headers=headers or {}) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if sse.data:
                out.append(sse)
    return out


# --- HTTP ---------------------------------------------------------------------------------


async def test_page_and_static_files_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for asset in ("static/app.js", "static/style.css", "static/vendor/uPlot.iife.min.js",
                  "static/vendor/uPlot.min.css"):
        assert f'"{asset}"' in page.text
        response = await client.get(f"/{asset}")
        assert response.status_code == 200, asset
        assert response.content == (STATIC / asset.removeprefix("static/")).read_bytes()
    licence = await client.get("/static/vendor/uPlot.LICENSE")
    assert "MIT License" in licence.text
    assert (await client.get("/static/nothing.js")).status_code == 404


async def test_config_lists_providers_and_the_simulated_pace(client: httpx.AsyncClient) -> None:
    config = (await client.get("/v1/console/config")).json()
    by_name = {p["name"]: p for p in config["providers"]}
    assert by_name["simulated"] == {"name": "simulated", "model": "simulated-1", "ready": True,
                                    "problem": None}
    assert by_name["openai"]["model"] == "gpt-4o-mini"
    assert by_name["anthropic"]["model"] == "claude-sonnet-4-5"
    assert all(p["ready"] for p in by_name.values())
    assert config["default_provider"] == "simulated"
    assert config["simulated"] == {"tokens_per_second": 50.0}
    assert config["consumers"] == ["sentences", "analytics"]


async def test_recent_generations_newest_first_with_status(client: httpx.AsyncClient) -> None:
    first = await create(client, max_tokens=3, tokens_per_second=0)
    await finish(client, first)
    second = await create(client, max_tokens=100_000, tokens_per_second=5)
    listed = (await client.get("/v1/console/generations", params={"limit": 2})).json()
    rows = listed["generations"]
    assert [r["id"] for r in rows] == [second, first]
    assert rows[0]["status"] == "running"
    assert rows[1]["status"] == "done"
    assert rows[1]["last_event_id"] == 4
    assert rows[1]["provider"] == "simulated"
    await client.post(f"/v1/streams/{second}/cancel")
    one = (await client.get("/v1/console/generations", params={"limit": 1})).json()
    assert [r["id"] for r in one["generations"]] == [second]
    assert (await client.get("/v1/console/generations", params={"limit": 0})).status_code == 422


async def test_figures_count_generations_clients_and_traffic(
    client: httpx.AsyncClient, served: tuple[str, Broker]
) -> None:
    before = (await client.get("/v1/console/figures")).json()
    assert before["active_generations"] == 0
    assert before["sse_clients"] == 0
    gid = await create(client, max_tokens=100_000, tokens_per_second=200)
    during: dict[str, Any] = {}
    async with aconnect_sse(client, "GET", f"/v1/streams/{gid}/events") as source:
        received = 0
        async for sse in source.aiter_sse():
            received += bool(sse.data)
            if received == 100:  # measure while this stream is open, then end it
                during = (await client.get("/v1/console/figures")).json()
                await client.post(f"/v1/streams/{gid}/cancel")
    assert during["active_generations"] == 1
    assert during["sse_clients"] == 1
    assert during["hub_readers"] >= 1
    assert during["tokens_in_per_second"] > 0
    assert during["tokens_out_per_second"] > 0
    assert during["fanout_ratio"] > 0
    [replica] = during["replicas"]  # one process: the deployment's figures are its own
    assert replica["replica"] == during["replica"] == served[1].manager.owner
    assert replica["sse_clients"] == 1
    after = (await client.get("/v1/console/figures")).json()
    assert after["sse_clients"] == 0
    assert set(after["consumers"]) == {"sentences", "analytics"}
    for figures in after["consumers"].values():
        assert figures["up"] == 1.0
        assert figures["workers"] == 1.0
        assert {"lag", "backlog", "pending", "dead_letters", "generations"} <= set(figures)


async def test_sentences_as_events_resumable_and_ending(client: httpx.AsyncClient) -> None:
    text = "One fish. Two fish! Red fish? Blue fish."
    gid = await create(client, text=text, tokens_per_second=50)
    events = await sentence_events(client, gid)
    assert [e.event for e in events] == ["sentence"] * 4 + ["end"]
    assert [json.loads(e.data)["text"] for e in events[:4]] == [
        "One fish.", "Two fish!", "Red fish?", "Blue fish."]
    assert [e.id for e in events] == ["1", "2", "3", "4", "4"]
    listed = (await client.get(f"/v1/streams/{gid}/sentences")).json()["sentences"]
    assert [json.loads(e.data) for e in events[:4]] == listed
    resumed = await sentence_events(client, gid, {"Last-Event-ID": "2"})
    assert [e.id for e in resumed] == ["3", "4", "4"]
    done = await client.get(f"/v1/streams/{gid}/sentences/events",
                            headers={"Last-Event-ID": "4"})
    assert done.status_code == 204
    assert (await client.get("/v1/streams/0123456789abcdef0123456789abcdef/sentences/events"
                             )).status_code == 404
    bad = await client.get(f"/v1/streams/{gid}/sentences/events", params={"after": "x"})
    assert bad.status_code == 400


# --- the page in Chromium ------------------------------------------------------------------


@pytest.fixture
async def page(served: tuple[str, Broker], server_settings: dict[str, Any]
               ) -> AsyncIterator[Any]:
    token = server_settings.get("api_tokens")
    from playwright.async_api import async_playwright

    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 1400})
            if token:  # as if typed into the page's token field before
                await context.add_init_script(
                    f"sessionStorage.setItem('tokentee.token', {json.dumps(token)})")
            tab = await context.new_page()
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            await tab.goto(served[0] + "/")
            await tab.wait_for_selector("body[data-ready=true]")
            # The providers come from the server: the page is wired once they are listed.
            await tab.wait_for_selector("#provider option[value=anthropic]", state="attached")
            tab.console_errors = errors
            yield tab
        finally:
            await browser.close()
    assert errors == []


async def pane_state(page: Any, reader: str) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(
        """(name) => { const p = window.tokentee.current.panes.find((x) => x.name === name);
        return {lastId: p.lastId, text: p.text, finished: p.finished,
                status: p.statusEl.textContent}; }""", reader)
    return state


async def wait_for_pane(page: Any, reader: str, condition: str) -> None:
    await page.wait_for_function(
        "(name) => { const p = window.tokentee.current.panes.find((x) => x.name === name);"
        f" return p && ({condition}); }}", arg=reader, timeout=30_000)


async def start_from_page(page: Any, *, max_tokens: int, pace: int) -> str:
    await page.get_by_label("Provider").select_option("simulated")
    await page.get_by_label("Max tokens").fill(str(max_tokens))
    await page.locator("#pace").fill(str(pace))
    await page.get_by_role("button", name="Start").click()
    await page.wait_for_function("window.tokentee.current.id !== null")
    gid: str = await page.evaluate("window.tokentee.current.id")
    return gid


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


@needs_chromium
async def test_two_readers_a_dropped_one_and_a_late_one_see_the_same_text(
    page: Any, client: httpx.AsyncClient
) -> None:
    gid = await start_from_page(page, max_tokens=160, pace=40)
    await wait_for_pane(page, "B", "p.lastId >= 10")
    await page.locator(".pane[data-reader=B] button.drop").click()
    dropped_at = (await pane_state(page, "B"))["lastId"]
    assert "dropped at id" in (await pane_state(page, "B"))["status"]
    # Reader A reads on while B is away; B then resumes from its own last id.
    await wait_for_pane(page, "A", f"p.lastId >= {dropped_at + 20}")
    assert (await pane_state(page, "B"))["lastId"] == dropped_at
    await page.locator(".pane[data-reader=B] button.drop").click()  # now "Resume"
    await page.get_by_role("button", name="Add a late reader").click()
    for reader in ("A", "B", "C"):
        await wait_for_pane(page, reader, "p.finished && p.statusEl.textContent.includes('done')")
    a, b, c = [await pane_state(page, r) for r in ("A", "B", "C")]
    server_text = (await client.get(f"/v1/streams/{gid}")).json()["text"]
    assert a["text"] == b["text"] == c["text"] == server_text
    assert a["lastId"] == b["lastId"] == c["lastId"] == 161
    assert f"resumed from id {dropped_at}, nothing missing" in b["status"]
    assert 0 < dropped_at < 161
    assert "resumed" not in a["status"]
    # Sentences and stats arrive beside the tokens.
    await page.wait_for_function(
        "document.getElementById('sent-status').textContent.startsWith('All ')")
    sentences = await page.locator("#sentence-list li").all_text_contents()
    assert len(sentences) == 10
    assert " ".join(sentences) == server_text
    await page.wait_for_function(
        "document.getElementById('st-complete').textContent === 'complete'")
    assert await page.locator("#st-tokens").text_content() == "160"
    assert (await page.locator("#st-ttft").text_content() or "").endswith(" ms")
    # Broker figures and the recent generations list.
    await page.wait_for_function(
        "document.getElementById('fg-lag').textContent.includes('sentences')")
    assert await page.locator("#fg-replicas").text_content() == "1"
    assert "(answered this poll)" in (await page.locator("#replica-list li").text_content()
                                      or "")
    await page.wait_for_function(
        f"document.getElementById('recent-body').textContent.includes('{gid}')")
    assert await page.locator("#gen-status").text_content() == "done"
    # The list shows the end without waiting for its next poll.
    row = page.locator("#recent-body tr", has=page.get_by_role(
        "button", name=f"Watch generation {gid}"))
    await row.locator("td.status-done").wait_for(timeout=5_000)
    assert (await page.locator("#fg-fanout").text_content() or "").endswith("\u00d7")
    assert await page.locator(".u-wrap").count() == 4  # the four charts are drawn
    await page.screenshot(path=screenshot_path("console.png"), full_page=True)
    # Watching it again from the list replays the finished generation in fresh panes.
    await page.get_by_role("button", name=f"Watch generation {gid}").click()
    for reader in ("A", "B"):
        await wait_for_pane(page, reader, "p.finished && p.resumedFrom === null")
        assert (await pane_state(page, reader))["text"] == server_text


@needs_chromium
async def test_cancel_from_the_page(page: Any, client: httpx.AsyncClient) -> None:
    gid = await start_from_page(page, max_tokens=5000, pace=20)
    await wait_for_pane(page, "A", "p.lastId >= 3")
    # Pause holds B's events back on an open connection; Continue shows them.
    await page.locator(".pane[data-reader=B] button.pause").click()
    paused = await pane_state(page, "B")
    await wait_for_pane(page, "B", f"p.held.length >= 3 && p.lastId >= {paused['lastId'] + 3}")
    held = await pane_state(page, "B")
    assert held["text"] == paused["text"]
    assert "events held" in held["status"]
    await page.locator(".pane[data-reader=B] button.pause").click()  # now "Continue"
    await wait_for_pane(page, "B", "p.held.length === 0 && !p.paused")
    assert len((await pane_state(page, "B"))["text"]) > len(paused["text"])
    await page.get_by_role("button", name="Cancel generation").click()
    for reader in ("A", "B"):
        await wait_for_pane(page, reader,
                            "p.finished && p.statusEl.textContent.includes('cancelled')")
    await page.wait_for_function(
        "document.getElementById('gen-status').textContent === 'cancelled'")
    status = (await client.get(f"/v1/streams/{gid}")).json()
    assert status["status"] == "cancelled"
    a, b = await pane_state(page, "A"), await pane_state(page, "B")
    assert a["text"] == b["text"] == status["text"]
    await page.screenshot(path=screenshot_path("console-cancelled.png"), full_page=True)


@needs_chromium
@pytest.mark.parametrize("consumer_types", [("analytics",)])
async def test_the_sentences_pane_says_when_no_logger_runs_and_catches_up_when_one_starts(
    page: Any, client: httpx.AsyncClient, served: tuple[str, Broker]
) -> None:
    gid = await start_from_page(page, max_tokens=40, pace=200)
    await page.wait_for_function(
        "document.getElementById('sent-status').textContent"
        ".startsWith('No sentence logger is running')")
    await wait_for_pane(page, "A", "p.finished")
    assert await page.locator("#sentence-list li").count() == 0
    # A logger started elsewhere (another process, here another Broker on the same Redis)
    # takes the generation that has already ended; the open stream delivers its sentences.
    settings = served[1].settings
    async with Broker.open(settings, consumers=[load_consumer_type("sentences", settings)]):
        await page.wait_for_function(
            "document.getElementById('sent-status').textContent.startsWith('All ')")
    sentences = await page.locator("#sentence-list li").all_text_contents()
    assert " ".join(sentences) == (await client.get(f"/v1/streams/{gid}")).json()["text"]


@needs_chromium
async def test_a_generation_started_with_cancel_if_unread_ends_once_every_pane_drops(
    page: Any, client: httpx.AsyncClient
) -> None:
    await page.get_by_label("Cancel if unread for (s)").fill("0.5")
    gid = await start_from_page(page, max_tokens=5000, pace=20)
    for reader in ("A", "B"):
        await wait_for_pane(page, reader, "p.lastId >= 2")
    assert (await client.get(f"/v1/streams/{gid}")).json()["status"] == "running"
    for reader in ("A", "B"):
        await page.locator(f".pane[data-reader={reader}] button.drop").click()

    async def unread() -> bool:
        status = (await client.get(f"/v1/streams/{gid}")).json()
        return bool(status["status"] == "cancelled" and status["cancel_reason"] == "unread")
    await until(unread, 30)
    await page.locator(".pane[data-reader=A] button.drop").click()  # now "Resume"
    await wait_for_pane(page, "A", "p.finished")
    state = await pane_state(page, "A")
    assert "finished: cancelled (unread)" in state["status"]
    assert state["text"] == (await client.get(f"/v1/streams/{gid}")).json()["text"]


@needs_chromium
async def test_readable_on_a_phone(page: Any) -> None:
    await page.set_viewport_size({"width": 390, "height": 844})
    await start_from_page(page, max_tokens=30, pace=200)
    await wait_for_pane(page, "B", "p.finished")
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    await page.screenshot(path=screenshot_path("console-phone.png"), full_page=True)


def test_every_static_file_is_package_data() -> None:
    """A non-editable install ships the page: every file under broker/static matches a
    ``package-data`` pattern of pyproject.toml."""
    root = STATIC.parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {
        p
        for package, patterns in setuptools["package-data"].items()
        if package in setuptools["packages"]  # package data of an unlisted package is dropped
        for pattern in patterns
        for p in (root / package.replace(".", "/")).glob(pattern)  # as setuptools globs
    }
    files = {p for p in STATIC.rglob("*") if p.is_file()}
    assert len(files) >= 6
    assert files - shipped == set()


@needs_chromium
async def test_no_accessibility_violations(page: Any) -> None:
    """axe-core's checks (the rules it runs by default: labels, names, contrast, landmarks,
    ARIA use) on the page with a finished generation, its panes, sentences and charts."""
    from axe_playwright_python.async_playwright import Axe

    await start_from_page(page, max_tokens=40, pace=200)
    await page.get_by_role("button", name="Add a late reader").click()
    await wait_for_pane(page, "C", "p.finished")
    await page.wait_for_function(
        "document.getElementById('sent-status').textContent.startsWith('All ')")
    results = await Axe().run(page)
    assert results.violations_count == 0, results.generate_report()


# --- with authentication on ------------------------------------------------------------------


@pytest.mark.parametrize("server_settings", [{"api_tokens": TOKEN}])
async def test_console_routes_need_a_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 200  # the page and its files hold no data
    assert (await client.get("/static/app.js")).status_code == 200
    for path in ("/v1/console/figures", "/v1/console/generations", "/v1/console/config"):
        assert (await client.get(path)).status_code == 401, path
        assert (await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
                ).status_code == 200, path
    created = (await client.post(
        "/v1/streams", headers={"Authorization": f"Bearer {TOKEN}"},
        json={"prompt": "hi", "params": {"text": "One. Two.", "tokens_per_second": 0}},
    )).json()
    path = f"/v1/streams/{created['id']}/sentences/events"
    assert (await client.get(path)).status_code == 401
    # A browser's EventSource cannot send a header: the generation's read token opens it.
    events = []
    async with aconnect_sse(client, "GET", path,
                            params={"token": created["read_token"]}) as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            if sse.data:
                events.append(sse.event)
    assert events == ["sentence", "sentence", "end"]


@needs_chromium
@pytest.mark.parametrize("server_settings", [{"api_tokens": TOKEN}])
async def test_the_page_works_with_authentication_on(page: Any, client: httpx.AsyncClient
                                                     ) -> None:
    assert await page.get_by_label("Access token").input_value() == TOKEN
    gid = await start_from_page(page, max_tokens=90, pace=30)
    await wait_for_pane(page, "A", "p.lastId >= 5")
    await page.locator(".pane[data-reader=A] button.drop").click()
    await page.locator(".pane[data-reader=A] button.drop").click()  # resume, a new token
    await page.get_by_role("button", name="Add a late reader").click()
    for reader in ("A", "B", "C"):
        await wait_for_pane(page, reader, "p.finished && p.statusEl.textContent.includes('done')")
    texts = {(await pane_state(page, r))["text"] for r in ("A", "B", "C")}
    status = (await client.get(f"/v1/streams/{gid}",
                               headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert texts == {status["text"]}
    await page.wait_for_function(
        "document.getElementById('sent-status').textContent.startsWith('All ')")
    await page.wait_for_function(
        "document.getElementById('st-complete').textContent === 'complete'")
    await page.wait_for_function(
        f"document.getElementById('recent-body').textContent.includes('{gid}')")
    assert await page.locator("#notice").text_content() == ""
