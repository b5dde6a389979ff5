"""The dashboard in headless Chromium, against the real app.

Chromium is Debian's package, driven by Playwright; Playwright's own browser
download is never used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from streaming import app_environment, execute, health, query, wait_streaming
from webtools import create_tables, get, module_app, start_app, token_hash, write_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST_RETRY = "[stream]\nretry_ms = 300\nheartbeat_seconds = 5\n"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(pg_cluster):
    with module_app(pg_cluster, FAST_RETRY) as (server, dsn):
        yield server, dsn


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    yield page
    context.close()


def open_dashboard(page: Page, server) -> None:
    page.goto(server.url("/"))
    expect(page.locator("#state")).to_have_text("live", timeout=15_000)


def insert_orders(dsn: str, *markets: str) -> None:
    values = ", ".join(f"('{m}', 'buy', 1, 20893.1500)" for m in markets)
    execute(
        dsn,
        f"INSERT INTO orders (market_id, side, quantity, price) VALUES {values}",
    )


def market_cells(page: Page) -> list[str]:
    texts = page.locator("#events tbody tr[data-channel=orders_changes] pre")
    return [
        text.split('"market_id": "')[1].split('"')[0]
        for text in texts.all_text_contents()
    ]


def test_dashboard_shows_events(served, page):
    server, dsn = served
    open_dashboard(page, server)

    insert_orders(dsn, "BTC-USD", "ETH-USD")
    execute(dsn, "INSERT INTO trades (order_id, quantity) VALUES (1, 5)")
    rows = page.locator("#events tbody tr")
    expect(rows).to_have_count(3, timeout=15_000)

    newest = rows.nth(0)
    expect(newest.locator("td").nth(1)).to_have_text("trades_changes")
    expect(newest.locator("td.operation")).to_have_text("INSERT")
    expect(rows.nth(2).locator("td.key")).to_have_text("id=1")
    expect(
        page.locator("#counters tr[data-channel=orders_changes] .count")
    ).to_have_text("2")
    expect(page.locator("#last-id")).to_have_text(health(server)["last_event_id"])
    rows.nth(2).locator("summary").click()
    expect(rows.nth(2).locator("pre")).to_contain_text('"price": 20893.1500')


def test_dashboard_loads_nothing_external(served, page):
    server, _ = served

    open_dashboard(page, server)
    response = get(server, "/")

    assert page.requested
    assert all(url.startswith(server.base_url + "/") for url in page.requested)
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"


def test_dashboard_escapes_row_values(served, page):
    server, dsn = served
    open_dashboard(page, server)
    hostile = '<img src=x onerror="window.hacked=1"><script>window.hacked=2</script>'

    query(
        dsn,
        "INSERT INTO orders (market_id, side, quantity, price) "
        "VALUES (%s, 'buy', 1, 1) RETURNING id",
        (hostile,),
    )
    row = page.locator("#events tbody tr").first
    expect(row.locator("pre")).to_contain_text("<img src=x", timeout=15_000)

    assert page.evaluate("window.hacked") is None
    assert page.locator("#events img, #events script").count() == 0


def test_dashboard_filters(served, page):
    server, dsn = served
    open_dashboard(page, server)
    page.locator("#channel-list input[value=orders_changes]").check()
    page.locator("#row-filters").fill("market_id=in.(SOL-USD,ADA-USD)")
    page.locator("#apply").click()
    expect(page.locator("#state")).to_have_text("live", timeout=15_000)

    execute(dsn, "INSERT INTO trades (order_id, quantity) VALUES (2, 2)")
    insert_orders(dsn, "DOT-USD", "SOL-USD", "XRP-USD", "ADA-USD")
    expect(page.locator("#events tbody tr")).to_have_count(2, timeout=15_000)

    assert market_cells(page) == ["ADA-USD", "SOL-USD"]


def test_dashboard_shows_filter_error(served, page):
    server, _ = served
    open_dashboard(page, server)

    page.locator("#row-filters").fill("no_such_column=eq.1")
    page.locator("#apply").click()

    expect(page.locator("#message")).to_contain_text("400:", timeout=15_000)
    expect(page.locator("#message")).to_contain_text("'no_such_column'")


def test_dashboard_catches_up_after_restart(app_server, database, tmp_path, page):
    create_tables(database)
    env = app_environment(
        database, tmp_path, CDC_CONFIG=write_config(tmp_path, FAST_RETRY)
    )
    first = app_server(env)
    wait_streaming(first)
    open_dashboard(page, first)
    insert_orders(database, *(f"BEFORE-{n}" for n in range(5)))
    expect(page.locator("#events tbody tr")).to_have_count(5, timeout=15_000)

    first.stop()
    expect(page.locator("#state")).not_to_have_text("live", timeout=15_000)
    insert_orders(database, *(f"DOWN-{n}" for n in range(5)))
    second = app_server(env, port=first.port)
    wait_streaming(second)
    insert_orders(database, *(f"AFTER-{n}" for n in range(5)))
    execute(database, "INSERT INTO trades (order_id, quantity) VALUES (3, 7)")

    expect(page.locator("#events tbody tr")).to_have_count(16, timeout=30_000)
    expect(page.locator("#state")).to_have_text("live")
    ids = page.locator("#events tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"
    )
    markets = market_cells(page)
    expected = [
        f"{phase}-{n}" for phase in ("BEFORE", "DOWN", "AFTER") for n in range(5)
    ]
    page.locator("#events tbody tr").first.locator("summary").click()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    assert len(set(ids)) == 16
    assert list(reversed(markets)) == expected
    assert page.locator("#last-id").text_content() == health(second)["last_event_id"]


def test_dashboard_pause_and_replay(served, page):
    server, dsn = served
    open_dashboard(page, server)
    insert_orders(dsn, "PAUSE-0")
    expect(page.locator("#events tbody tr")).to_have_count(1, timeout=15_000)
    first_id = page.locator("#events tbody tr").first.get_attribute("data-id")

    page.locator("#pause").click()
    expect(page.locator("#state")).to_have_text("paused")
    insert_orders(dsn, "PAUSE-1", "PAUSE-2")
    page.wait_for_timeout(500)
    paused_rows = page.locator("#events tbody tr").count()
    page.locator("#pause").click()
    expect(page.locator("#events tbody tr")).to_have_count(3, timeout=15_000)

    page.locator("#replay-from").fill(first_id)
    page.locator("#replay button").click()
    expect(page.locator("#events tbody tr")).to_have_count(2, timeout=15_000)

    assert paused_rows == 1
    assert market_cells(page) == ["PAUSE-2", "PAUSE-1"]


def test_dashboard_token_flow(app_server, database, tmp_path, page):
    create_tables(database)
    token = "dashboard-token-0123456789abcdef"
    config = (
        FAST_RETRY + f'[auth]\nmode = "required"\n[[auth.tokens]]\nname = "dash"\n'
        f'hash = "{token_hash(token)}"\nchannels = ["orders_changes"]\n'
    )
    server = start_app(app_server, database, tmp_path, config)

    page.goto(server.url("/"))
    expect(page.locator("#message")).to_contain_text("401:", timeout=15_000)
    page.wait_for_timeout(2000)
    rejected = [url for url in page.requested if "/api/realtime" in url]
    # A new query string makes this a full load, not a same-page hash change.
    page.goto(server.url("/?with-token#access_token=" + token))
    expect(page.locator("#state")).to_have_text("live", timeout=15_000)
    insert_orders(database, "WITH-TOKEN")
    expect(page.locator("#events tbody tr")).to_have_count(1, timeout=15_000)

    assert len(rejected) <= 2
    assert "access_token" not in page.url
    assert page.locator("#channel-list input").count() == 1
    assert token not in server.output()
