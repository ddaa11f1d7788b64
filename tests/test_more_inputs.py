"""More of what people ingest, end to end with a real broker and workers (the chunker with the
local OCR engine on): pages from a URL served by a loopback server that DOCFLOW_URL_ALLOW
admits, and a scanned PDF. Nothing here connects outside 127.0.0.0/8: the refused addresses
are refused before any connection.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from aiohttp import web

from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.local import documents
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.topics import CHUNKS_PROCESSED
from tests.scans import recall, scan, scanned_pdf
from tests.stack import read_topic

TAG = uuid.uuid4().hex[:8]
ARTICLE = f"""<!doctype html><html><head><title>Tide tables {TAG}</title></head><body>
<nav><a href="/">Home</a> <a href="/shop">Shop the navigation bazaar</a> <a href="/login">Sign in</a></nav>
<header><p>Subscribe to the harbour newsletter today</p></header>
<main><article><h1>How the tides of {TAG} bay are measured</h1>
<p>The harbour master reads the tide gauge every hour and records the height of the water
against the old stone pier.</p>
<p>Spring tides come twice a month, when the sun and the moon pull in the same direction,
and neap tides fall between them.</p>
<p>Sailors of {TAG} bay plan their departures around the ebb, because the channel is shallow at low water.</p>
</article></main>
<aside>Sponsored: cheap ferry tickets and cruise deals</aside>
<footer>Copyright footer text, privacy policy and cookie settings</footer>
</body></html>"""
PDF_PAGES = [f"A report {TAG} served with the wrong type. Page {n} speaks of lighthouses." for n in (1, 2)]


class PageServer:
    """An aiohttp server on 127.0.0.1 in a thread of its own: the pages the workers fetch."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    def routes(self) -> web.Application:
        app = web.Application()

        async def article(request):
            return web.Response(text=ARTICLE, content_type="text/html")

        async def mislabelled_pdf(request):
            return web.Response(body=documents.make_pdf(PDF_PAGES), content_type="text/plain")

        async def hop(request):
            n = int(request.match_info["n"])
            raise web.HTTPFound("/article" if n == 0 else f"/hop/{n - 1}")

        async def to_metadata(request):
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

        app.router.add_get("/article", article)
        app.router.add_get("/report", mislabelled_pdf)
        app.router.add_get("/hop/{n}", hop)
        app.router.add_get("/escape", to_metadata)
        return app

    def start(self) -> None:
        def run() -> None:
            asyncio.set_event_loop(self._loop)
            runner = web.AppRunner(self.routes())
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            self._ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def pages():
    server = PageServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(kafka_settings, tmp_path_factory):
    env = worker_env(kafka_settings, DOCFLOW_URL_ALLOW="127.0.0.1/32", DOCFLOW_OCR="local", DOCFLOW_OCR_DPI="150")
    workers = WorkerStack(kafka_settings, env, tmp_path_factory.mktemp("url-worker-logs"))
    try:
        workers.launch({"web": 1, "chunker": 1, "embedder": 1})
        yield workers
    finally:
        workers.stop_all()


def ingest(stack, url: str, company: str) -> dict:
    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, company) as client:
            answer = await client.upload_url(url, title="from the web")
            return await client.wait(answer["document_id"], 120)

    return asyncio.run(run())


def chunk_texts(settings, document_id: str) -> str:
    chunks = asyncio.run(read_topic(settings, CHUNKS_PROCESSED.name, {document_id}, 1, timeout=20))
    return " ".join(chunk["text"] for chunk in chunks)


def test_an_html_article_is_ingested_without_its_boilerplate(stack, pages, kafka_settings):
    status = ingest(stack, f"{pages.url}/article", "harbour")
    assert status["state"] == "completed", status
    assert status["source_url"] == f"{pages.url}/article"
    text = chunk_texts(kafka_settings, status["document_id"])
    assert "harbour master reads the tide gauge" in text and f"Sailors of {TAG} bay" in text
    for boilerplate in ("navigation bazaar", "Subscribe to the harbour newsletter", "cheap ferry", "Copyright footer"):
        assert boilerplate not in text


def test_a_pdf_served_as_text_is_read_as_a_pdf_and_kept_like_an_upload(stack, pages, kafka_settings):
    status = ingest(stack, f"{pages.url}/report", "harbour")
    assert status["state"] == "completed" and status["pages"] == 2, status
    assert "lighthouses" in chunk_texts(kafka_settings, status["document_id"])
    stored = list((kafka_settings.home / "objects" / "harbour" / status["document_id"]).iterdir())
    assert [path.read_bytes()[:5] for path in stored] == [b"%PDF-"]


def test_a_redirect_chain_is_followed(stack, pages, kafka_settings):
    status = ingest(stack, f"{pages.url}/hop/3", "harbour")
    assert status["state"] == "completed", status
    assert "tide gauge" in chunk_texts(kafka_settings, status["document_id"])


def test_a_url_redirecting_to_a_refused_address_fails_with_the_reason_and_fetches_nothing(stack, pages):
    status = ingest(stack, f"{pages.url}/escape", "harbour")
    assert status["state"] == "failed"
    assert "169.254.169.254" in status["error"] and "refused" in status["error"]
    assert status["chunks_total"] is None


def test_a_malformed_url_is_refused_at_the_door(stack):
    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, "harbour") as client:
            refusals = []
            for url in ("ftp://127.0.0.1/file", "file:///etc/passwd", "http://user:pw@127.0.0.1/", "not a url", ""):
                with pytest.raises(ApiError) as refused:
                    await client.upload_url(url)
                refusals.append((refused.value.status, refused.value.code))
            return refusals

    assert asyncio.run(run()) == [(422, "invalid_url")] * 5


def test_a_scanned_pdf_completes_with_its_words_read_by_ocr(stack, kafka_settings, tmp_path):
    lines = [
        [f"Scanned invoice {TAG} from the harbour", "office for repairs to the old pier", "and the tide gauge"],
        ["The total is due within thirty days", "payable to the harbour master", "of the northern bay"],
    ]
    path = tmp_path / "scan.pdf"
    path.write_bytes(scanned_pdf([scan(page) for page in lines]))

    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, "harbour") as client:
            answer = await client.upload(path)
            return await client.wait(answer["document_id"], 180)

    status = asyncio.run(run())
    assert status["state"] == "completed", status
    assert (status["pages"], status["pages_ocred"], status["pages_unreadable"]) == (2, 2, 0)
    found = chunk_texts(kafka_settings, status["document_id"])
    assert recall(" ".join(" ".join(page) for page in lines), found) >= 0.9


def test_a_word_document_and_a_slide_deck_complete_with_their_text(stack, kafka_settings, tmp_path):
    docx = tmp_path / "handbook.docx"
    docx.write_bytes(
        documents.make_docx(
            [
                (1, f"Harbour handbook {TAG}"),
                "Boats moor at the eastern quay and pay at the harbour office.",
                [["Berth", "Fee"], ["East quay", "12 euros a night"]],
            ]
        )
    )
    pptx = tmp_path / "briefing.pptx"
    pptx.write_bytes(
        documents.make_pptx(
            [
                {"title": f"Storm briefing {TAG}", "text": ["Gales expected on Thursday"], "notes": "Close the pier."},
                {"title": "Actions", "table": [["Who", "What"], ["Crew", "double the mooring lines"]]},
            ]
        )
    )

    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, "harbour") as client:
            answers = [await client.upload(path) for path in (docx, pptx)]
            return await client.wait_all([answer["document_id"] for answer in answers], 120), answers

    finished, answers = asyncio.run(run())
    word, deck = (finished[answer["document_id"]] for answer in answers)
    assert word["state"] == deck["state"] == "completed", (word, deck)
    assert deck["pages"] == 2
    word_text = chunk_texts(kafka_settings, word["document_id"])
    assert f"Harbour handbook {TAG}" in word_text and "East quay | 12 euros a night" in word_text
    chunks = asyncio.run(read_topic(kafka_settings, CHUNKS_PROCESSED.name, {deck["document_id"]}, 1, timeout=20))
    by_page = {chunk["page"]: chunk["text"] for chunk in chunks}
    assert f"Storm briefing {TAG}" in by_page[1] and "Notes: Close the pier." in by_page[1]
    assert "Crew | double the mooring lines" in by_page[2]
