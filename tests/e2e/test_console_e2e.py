"""The web console (/console/) in headless Chromium against the real system (tiny model): sign
in, a chat streaming token by token, Stop aborting the engine request, two endpoints compared,
a similarity matrix, tokens created and revoked by an admin, a non-admin kept from admin data.
Every page is photographed at a laptop's and a phone's width under .fmapi/screenshots/, and no
page may trip its Content-Security-Policy or throw."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import httpx
import numpy as np
import pytest
from playwright.async_api import TimeoutError as PlaywrightTimeout

from helpers.browser import LAPTOP, PHONE, chromium, open_page
from helpers.engine import running_requests
from helpers.tiny_llm import LONG_GENERATION

pytestmark = pytest.mark.slow

SECOND_CHAT = "console-chat-b"  # made here for Compare, deleted at the end


@pytest.fixture(scope="module")
async def browser():
    async with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def second_chat(http):
    r = http.post("/api/2.0/serving-endpoints", json={
        "name": SECOND_CHAT, "task": "llm/v1/chat",
        "config": {"served_entities": [{"entity_name": "tiny"}]}})
    assert r.status_code == 200, r.text
    # Every gateway's copy of the registry has it within a second (docs/architecture.md); the
    # page's endpoint list may come from any of them.
    time.sleep(1.5)
    yield SECOND_CHAT
    http.delete(f"/api/2.0/serving-endpoints/{SECOND_CHAT}")


async def sign_in(tab, system, token: str | None = None) -> None:
    page = tab.page
    await page.goto(f"{system.base_url}/console/")
    await page.locator("#token-input").fill(token or system.admin_token)
    await page.locator("#token-input").press("Enter")  # keyboard: the form submits
    await page.locator("#nav").wait_for(state="visible")


async def goto(tab, page_id: str) -> None:
    await tab.page.evaluate("id => { window.location.hash = '#/' + id; }", page_id)
    await tab.page.locator(f"#page-{page_id}").wait_for(state="visible")


async def reveal(locator):
    """Open the <details> a control is folded in (settings fold away on a phone)."""
    await locator.evaluate("""el => {
      for (let d = el.closest('details'); d; d = d.parentElement.closest('details')) d.open = true;
    }""")
    return locator


async def settings(page, prefix: str, **values) -> None:
    for name, value in values.items():
        await (await reveal(page.locator(f"#{prefix}-{name}"))).fill(str(value))


async def wait_until(predicate, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def engine_idle(system) -> bool:
    return await asyncio.to_thread(running_requests, system) == 0


# Records the length of the last answer's text at every change (MutationObserver).
WATCH_GROWTH = """sel => {
  window.__lengths = [];
  const root = document.querySelector(sel);
  new MutationObserver(() => {
    const all = root.querySelectorAll('.msg.assistant .text');
    if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
  }).observe(root, {childList: true, subtree: true, characterData: true});
}"""


async def test_the_page_needs_no_token_and_a_wrong_token_gets_a_clear_message(browser, system):
    async with open_page(browser) as tab:
        page = tab.page
        resp = await page.goto(f"{system.base_url}/console/")
        assert resp.status == 200
        await page.locator("#token-input").wait_for()
        assert not await page.get_by_role("button", name="Sign out").is_visible()
        assert not await page.get_by_role("navigation").is_visible()
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        # The focus starts in the token field: type, Enter.
        await page.keyboard.type("not-a-real-token")
        await page.keyboard.press("Enter")
        await page.get_by_role("alert").filter(has_text="That token was not accepted").wait_for()
        assert await page.evaluate("Object.keys(sessionStorage).length") == 0
        await page.locator("#token-input").fill(system.admin_token)
        await page.locator("#token-input").press("Enter")
        await page.get_by_role("heading", name="Playground").wait_for()
        kept = await page.evaluate("sessionStorage.getItem('fmapi.console.token')")
        assert kept == system.admin_token
        assert system.admin_token not in page.url and await page.evaluate("document.cookie") == ""
        # A reload keeps the session (same tab); signing out forgets it.
        await page.reload()
        await page.get_by_role("heading", name="Playground").wait_for()
        await page.get_by_role("button", name="Sign out").click()
        await page.locator("#token-input").wait_for()
        assert await page.evaluate("Object.keys(sessionStorage).length") == 0
        tab.assert_clean()
    # Every data call needs the token; only the page's files are public.
    with httpx.Client(base_url=system.base_url) as anon:
        assert anon.get("/console/js/main.js").status_code == 200
        assert anon.get("/v1/models").status_code == 401
        assert anon.post("/console/", content=b"x").status_code == 401


# Tokens per answer: a stream long enough to be seen growing (and two to overlap) even when a
# busy machine delivers it in bursts (the tiny model makes a few hundred tokens a second).
CHAT_TOKENS = 500


async def test_a_chat_streams_token_by_token_with_usage_ttft_and_code(browser, system):
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system)
        await page.locator("#pg-endpoint").select_option("tiny-chat")
        await settings(page, "pg", temperature=0, **{"max-tokens": CHAT_TOKENS},
                       extra=json.dumps({"ignore_eos": True}))
        answer = page.locator("#page-playground .msg.assistant").last
        for _ in range(3):
            await page.locator("#page-playground").get_by_role("button", name="Clear").click()
            await page.evaluate(WATCH_GROWTH, "#page-playground .log")
            await page.locator("#pg-input").fill("hello there, how are you today")
            await page.locator("#pg-input").press("Enter")
            await answer.and_(page.locator("[data-state=done]")).wait_for(timeout=60_000)
            lengths = await page.evaluate("window.__lengths")
            grew = sorted(set(lengths))
            if len(grew) >= 3:
                break
            # On a busy machine the page can be handed the whole answer in one burst (the
            # network log shows it streamed): nothing was seen growing. Again.
        assert len(grew) >= 3 and lengths == sorted(lengths), lengths  # it grew, piece by piece
        text = await answer.locator(".text").inner_text()
        assert len(text) == grew[-1] > 0
        stats = await answer.locator(".stats").inner_text()
        assert re.search(r"TTFT \d+ ms", stats) and f"/ {CHAT_TOKENS} out tokens" in stats, stats

        # A second turn carries the conversation.
        await page.locator("#pg-input").fill("and again")
        await page.locator("#pg-send").click()
        await page.locator("#page-playground .msg.assistant[data-state=done]").nth(1).wait_for()

        await tab.screenshot("console-playground-in-use-laptop")
        await page.locator("#pg-code").click()
        dialog = page.get_by_role("dialog")
        await dialog.wait_for()
        curl = await dialog.locator("pre:visible").inner_text()
        assert f"{system.base_url}/v1/chat/completions" in curl and '"model": "tiny-chat"' in curl
        assert '"ignore_eos": true' in curl and "and again" in curl
        await page.get_by_role("tab", name="Python").click()
        python = await dialog.locator("pre:visible").inner_text()
        assert "from openai import OpenAI" in python and "extra_body=" in python
        assert f'base_url="{system.base_url}/v1"' in python and "stream=True" in python
        await page.get_by_role("tab", name="Python").press("ArrowRight")  # tabs follow the keys
        node = await dialog.locator("pre:visible").inner_text()
        assert 'import OpenAI from "openai"' in node and "for await" in node
        assert system.admin_token not in curl + python + node
        await tab.screenshot("console-playground-code-laptop", full_page=False)
        await page.keyboard.press("Escape")

        # The same conversation goes on through Databricks' per-endpoint path.
        await page.locator("#pg-path").select_option("databricks")
        await page.locator("#pg-input").fill("once more")
        await page.locator("#pg-input").press("Enter")
        third = page.locator("#page-playground .msg.assistant[data-state=done]").nth(2)
        await third.wait_for()
        assert f"/ {CHAT_TOKENS} out tokens" in await third.locator(".stats").inner_text()
        assert ("POST", "/serving-endpoints/tiny-chat/invocations", 200) in tab.responses
        await page.locator("#pg-code").click()
        await page.get_by_role("tab", name="curl").click()
        curl = await dialog.locator("pre:visible").inner_text()
        assert f"{system.base_url}/serving-endpoints/tiny-chat/invocations" in curl
        assert '"model"' not in curl and "once more" in curl
        await page.keyboard.press("Escape")
        tab.assert_clean()


async def test_stop_cancels_the_stream_and_the_engine_goes_idle(browser, system):
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system)
        await page.locator("#pg-endpoint").select_option("tiny-chat")
        await settings(page, "pg", **{"max-tokens": LONG_GENERATION},
                       extra=json.dumps({"ignore_eos": True}))
        answer = page.locator("#page-playground .msg.assistant").last
        error = page.locator("#page-playground .notice.error:visible")
        stop = page.locator("#pg-stop")
        for _ in range(5):
            # (A fresh conversation each time: a whole long answer would fill the context.)
            await page.locator("#page-playground").get_by_role("button", name="Clear").click()
            finished = await engine_finished(system)
            await page.locator("#pg-input").fill("tell me a very long story")
            await page.locator("#pg-send").click()
            # Mid-way: the answer's first words are on the page; Stop.
            await answer.and_(page.locator("[data-state]")).or_(error).first.wait_for()
            assert not await error.count(), await error.inner_text()
            await wait_until(lambda: _text_or_end(answer), 30, "no text arrived")
            with contextlib.suppress(PlaywrightTimeout):
                await stop.click(timeout=2000)
            stopped_at = time.monotonic()
            await answer.and_(page.locator("[data-state=stopped], [data-state=done]")).wait_for()
            await wait_until(lambda: engine_idle(system), 10, "the engine never went idle")
            # Aborted: the page stopped its stream and the engine never ran the request to its
            # end.
            if (await answer.get_attribute("data-state") == "stopped"
                    and await engine_finished(system) == finished):
                break
            # On a busy machine the engine can finish long before its stream has been relayed
            # (or the whole answer can arrive before the click): nothing was left to abort. Again.
        else:
            pytest.fail("the engine finished every request before Stop could abort it")
        assert time.monotonic() - stopped_at < 2.0, "the engine request was not aborted promptly"
        assert "stopped" in await answer.locator(".stats").inner_text()
        text = answer.locator(".text")
        before = len(await text.inner_text())
        await asyncio.sleep(0.5)
        assert len(await text.inner_text()) == before  # nothing more arrives
        assert await page.locator("#pg-send").is_enabled() and await stop.is_disabled()
        tab.assert_clean()


async def engine_finished(system) -> float:
    """Requests the tiny model's engine ran to their max_tokens (ignore_eos: every one that was
    not aborted)."""
    return await asyncio.to_thread(system.metric, "generation-tiny", "vllm:request_success_total",
                                   finished_reason="length")


async def _text_or_end(answer) -> bool:
    return (await answer.get_attribute("data-state") != "streaming"
            or bool(await answer.locator(".text").text_content()))


async def test_compare_streams_two_endpoints_in_parallel(browser, system, second_chat):
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system)
        await goto(tab, "compare")
        await page.locator("#cmp-endpoint-a").select_option("tiny-chat")
        await page.locator("#cmp-endpoint-b").select_option(second_chat)
        await settings(page, "cmp", **{"max-tokens": CHAT_TOKENS}, extra=json.dumps({"ignore_eos": True}))
        # When the page sent each request and when its answer ended, on this test's clock (the
        # browser's network events): the page's own rendering can lag behind on a busy machine.
        sent: dict[str, float] = {}
        ended: dict[str, float] = {}

        def model_of(request) -> str | None:
            if request.url.endswith("/v1/chat/completions"):
                return request.post_data_json["model"]
            return None

        def on_request(request) -> None:
            if (model := model_of(request)) is not None:
                sent[model] = time.monotonic()

        def on_end(request) -> None:
            if (model := model_of(request)) is not None:
                ended[model] = time.monotonic()

        page.on("request", on_request)
        page.on("requestfinished", on_end)
        page.on("requestfailed", on_end)
        await page.locator("#cmp-input").fill("which is faster?")
        await page.locator("#cmp-input").press("Enter")
        for side in ("a", "b"):
            await page.locator(f"#cmp-metrics-{side} [data-metric='Completion tokens']").wait_for(
                timeout=60_000)

        async def both() -> bool:
            return len(ended) == 2

        await wait_until(both, 30, f"the browser never saw both answers end: {ended}")
        a, b = "tiny-chat", second_chat
        # In parallel: each request was sent before the other's answer ended.
        assert sent[a] < ended[b] and sent[b] < ended[a], (sent, ended)
        for side in ("a", "b"):
            metrics = page.locator(f"#cmp-metrics-{side}")
            assert await metrics.locator("[data-metric='Completion tokens']").inner_text() == str(CHAT_TOKENS)
            assert re.fullmatch(r"\d+ ms", await metrics.locator(
                "[data-metric='Time to first token']").inner_text())
            assert re.fullmatch(r"\d+ ms", await metrics.locator(
                "[data-metric='Total latency']").inner_text())
            assert int(await metrics.locator("[data-metric='Prompt tokens']").inner_text()) > 0
            assert await page.locator(f"#cmp-pane-{side} .msg.assistant .text").inner_text()
        await tab.screenshot("console-compare-in-use-laptop")
        tab.assert_clean()


SENTENCES = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell sharply today."]


async def test_embeddings_show_the_cosine_similarity_matrix(browser, system, http):
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system)
        await goto(tab, "embeddings")
        await page.locator("#emb-endpoint").select_option("all-minilm-l6-v2")
        await page.locator("#emb-input").fill("\n".join(SENTENCES) + "\n\n")
        await page.locator("#emb-go").click()
        cells = page.locator("#emb-result table.heatmap td.cell")
        await cells.first.wait_for()
        shown = np.zeros((3, 3))
        assert await cells.count() == 9
        for i in range(9):
            cell = cells.nth(i)
            r = int(await cell.get_attribute("data-row"))
            c = int(await cell.get_attribute("data-col"))
            shown[r, c] = float(await cell.get_attribute("data-value"))
        vectors = np.array([d["embedding"] for d in http.post("/v1/embeddings", json={
            "model": "all-minilm-l6-v2", "input": SENTENCES}).json()["data"]])
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        assert np.allclose(shown, unit @ unit.T, atol=1e-4)
        assert shown[0, 1] > shown[0, 2]  # the two cats are closer than cat and stocks
        assert "384 dimensions" in await page.locator("#emb-stats").inner_text()
        await tab.screenshot("console-embeddings-in-use-laptop")
        tab.assert_clean()


async def test_endpoints_page_lists_state_task_capacity_limits_and_replicas(browser, system):
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system)
        await goto(tab, "endpoints")
        row = page.locator("tr[data-endpoint='tiny-chat']")
        await row.wait_for()
        assert await row.locator("[data-col=task]").inner_text() == "llm/v1/chat"
        assert await row.locator("[data-col=state]").inner_text() == "Ready"
        assert await row.locator("[data-col=capacity]").inner_text() == "pay-per-token"
        assert await row.locator("[data-col=replicas]").inner_text() == "1"
        assert "default max_tokens 16" in await row.locator("[data-col=limits]").inner_text()
        pt = page.locator("tr[data-endpoint='q-provisioned'] [data-col=capacity]")
        assert (await pt.inner_text()).startswith("provisioned throughput")
        old = page.locator("tr[data-endpoint='tiny-chat-old'] [data-col=state]")
        assert await old.inner_text() == "Retired → tiny-chat"
        ceiling = page.locator("tr[data-endpoint='q-embed-ceiling'] [data-col=limits]")
        assert "endpoint: 30 requests/min" in await ceiling.inner_text()
        tab.assert_clean()


async def test_an_admin_creates_copies_and_revokes_a_token(browser, system):
    async with open_page(browser) as tab:
        page = tab.page
        await tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
        await sign_in(tab, system)
        await goto(tab, "tokens")
        await page.locator("#tok-comment").fill("console e2e")
        await page.locator("#tok-endpoints").fill("tiny-chat")
        await page.locator("#tok-principal").fill("console-carol")
        await page.locator("#tok-create").click()
        secret_box = page.locator("#tok-secret-box")
        await secret_box.wait_for()
        secret = await page.locator("#tok-secret").input_value()
        token_id = re.search(r"Token (\w+) created", await secret_box.inner_text()).group(1)
        await page.locator("#tok-copy").click()
        await page.get_by_text("Copied to the clipboard.").wait_for()
        assert await page.evaluate("navigator.clipboard.readText()") == secret
        await tab.screenshot("console-tokens-secret-laptop")
        with httpx.Client(base_url=system.base_url,
                          headers={"authorization": f"Bearer {secret}"}) as carol:
            models = carol.get("/v1/models")
            assert models.status_code == 200
            assert [m["id"] for m in models.json()["data"]] == ["tiny-chat"]
            row = page.locator(f"tr[data-token='{token_id}']")
            assert "console-carol" in await row.inner_text()
            # Shown once: after "I have copied it", the secret is nowhere on the page.
            await page.get_by_role("button", name="I have copied it").click()
            assert secret not in await page.content()
            await row.locator("[data-revoke]").click()
            await row.locator("[data-confirm]").click()
            await row.wait_for(state="detached")
            deadline = time.monotonic() + 3
            while carol.get("/v1/models").status_code != 401:
                assert time.monotonic() < deadline, "a revoked token still works"
                time.sleep(0.1)
        tab.assert_clean()


async def test_usage_chart_shows_tokens_per_day_per_endpoint_for_an_admin(browser, system):
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system)
        await goto(tab, "usage")
        # The chats above are in the usage table within a few seconds (the writer drains them).
        table = page.locator("#page-usage table.usage-table")
        deadline = time.monotonic() + 30
        while not await table.locator("th", has_text="tiny-chat").count():
            assert time.monotonic() < deadline, "no tiny-chat usage shown"
            await asyncio.sleep(1)
            await page.locator("#usage-window").select_option("1d")
            await page.locator("#usage-window").select_option("7d")
        assert await page.locator("#usage-chart svg.chart rect.bar").count() > 0
        assert "everyone" in await page.locator("#usage-summary").inner_text()
        assert await page.locator("#usage-principal option").count() >= 2
        tab.assert_clean()


async def test_a_non_admin_sees_only_their_own_and_no_admin_data(browser, system, http):
    made = http.post("/api/2.0/token/create", json={
        "comment": "console non-admin", "principal": "console-bob",
        "endpoints": ["tiny-chat", "all-minilm-l6-v2"]}).json()
    bob = made["token_value"]
    with httpx.Client(base_url=system.base_url, headers={"authorization": f"Bearer {bob}"}) as c:
        assert c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                              "input": "bob's own"}).status_code == 200
    async with open_page(browser) as tab:
        page = tab.page
        await sign_in(tab, system, bob)
        assert "console-bob" in await page.locator("#session-who").inner_text()
        nav = await page.locator("#nav-list a").all_inner_texts()
        assert "Tokens" not in nav and "Usage" in nav
        assert await page.locator("#pg-endpoint option").all_inner_texts() == ["tiny-chat"]

        await goto(tab, "endpoints")
        await page.locator("tr[data-endpoint]").first.wait_for()
        rows = await page.locator("tr[data-endpoint]").all()
        names = [await r.get_attribute("data-endpoint") for r in rows]
        assert sorted(names) == ["all-minilm-l6-v2", "tiny-chat"]

        await goto(tab, "usage")
        table = page.locator("#page-usage table.usage-table")
        deadline = time.monotonic() + 30
        while not await table.count():
            assert time.monotonic() < deadline, "bob's usage never showed"
            await asyncio.sleep(1)
            await page.locator("#usage-window").select_option("1d")
            await page.locator("#usage-window").select_option("7d")
        heads = await table.locator("thead th").all_text_contents()
        assert heads == ["Day", "all-minilm-l6-v2", "Total"]  # only bob's own requests
        assert await page.locator("#usage-principal").count() == 0
        assert "console-bob" in await page.locator("#usage-summary").inner_text()

        await goto(tab, "tokens")  # typed by hand: the page says no, and asks for nothing
        assert "needs an admin token" in await page.locator("#page-tokens").inner_text()
        assert await page.locator("#page-tokens table").count() == 0
        assert not [r for r in tab.responses if r[1] == "/api/2.0/token/list" and r[2] == 200]
        # The API itself refuses, whatever a page does.
        with httpx.Client(base_url=system.base_url,
                          headers={"authorization": f"Bearer {bob}"}) as c:
            assert c.get("/api/2.0/token/list").status_code == 403
            groups = c.get("/api/2.0/usage", params={"by": "principal"}).json()["groups"]
            assert {g["principal"] for g in groups} == {"console-bob"}
        tab.assert_clean()
    http.post("/api/2.0/token/delete", json={"token_id": made["token_info"]["token_id"]})


PAGES = ["playground", "compare", "embeddings", "endpoints", "usage", "tokens"]


@pytest.mark.parametrize("width", ["laptop", "phone"])
async def test_every_page_fits_a_laptop_and_a_phone(browser, system, width):
    viewport = {"laptop": LAPTOP, "phone": PHONE}[width]
    async with open_page(browser, viewport) as tab:
        page = tab.page
        await page.goto(f"{system.base_url}/console/")
        await page.locator("#token-input").wait_for()
        await tab.screenshot(f"console-signin-{width}")
        await sign_in(tab, system)
        await (await reveal(page.locator("#pg-endpoint"))).select_option("tiny-chat")
        if width == "phone":  # folded again, as a phone shows it
            await page.locator("#page-playground .settings-toggle > summary").click()
        await page.locator("#pg-input").fill("hi")
        await page.locator("#pg-input").press("Enter")
        await page.locator("#page-playground .msg.assistant[data-state=done]").wait_for()
        for page_id in PAGES:
            await goto(tab, page_id)
            if page_id == "embeddings":
                await page.locator("#emb-endpoint").select_option("all-minilm-l6-v2")
                await page.locator("#emb-go").click()
                await page.locator("#emb-result table").wait_for()
            elif page_id in ("endpoints", "tokens"):
                await page.locator(f"#page-{page_id} tbody tr").first.wait_for()
            await page.wait_for_load_state("networkidle")
            # Nothing wider than the screen (tables scroll inside their own box).
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{page_id} is {overflow}px wider than a {width} screen"
            await tab.screenshot(f"console-{page_id}-{width}")
        tab.assert_clean()
