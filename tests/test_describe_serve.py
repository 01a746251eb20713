"""`dalipipe serve`: the caption page on a real uvicorn server, asked over HTTP and in headless
Chromium (Playwright driving Debian's /usr/bin/chromium; skipped only where chromium is not
installed). The page shows the captions `dalipipe caption` gives (tests/test_describe_api.py).

    pytest tests/test_describe_serve.py -x -q
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.support.describe import BEFORE, FEATURES, TOKENS, VIDEO, WAV16K, write_model

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MAX_UPLOAD = 2 * 2**20
pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason="shared data clips missing")


@pytest.fixture(scope="module")
def captioner(tiny_models, tmp_path_factory):
    from dalipipe import Captioner

    model = write_model(
        tmp_path_factory.mktemp("serve") / "ot_att", tiny_models, {"features": FEATURES}
    )
    return Captioner.load(model, device="cpu")


@pytest.fixture(scope="module")
def server(captioner):
    """The page's application on 127.0.0.1 (a free port); yields its base URL."""
    import uvicorn

    from dalipipe.describe.serve import build_app

    app = build_app(
        captioner, {"max_new_tokens": TOKENS}, max_upload_bytes=MAX_UPLOAD, model_name="tiny"
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    running = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if running.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    running.should_exit = True
    thread.join(timeout=10)


def post(url: str, name: str, data: bytes, modality: str = "audio") -> tuple[int, dict]:
    """A multipart/form-data POST of one file and the modality, as the page sends it."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="modality"\r\n\r\n{modality}\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n",
    ]
    body = "".join(parts).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url + "/caption",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_an_upload_gets_the_caption_of_the_file(server, captioner):
    status, answer = post(server, VIDEO.name, VIDEO.read_bytes())
    assert status == 200
    assert answer == {
        "file": VIDEO.name,
        "modality": "audio",
        "decoding": "greedy",
        "caption": BEFORE[VIDEO],
    }
    status, answer = post(server, "clip.mp4", VIDEO.read_bytes(), modality="image")
    [expected] = captioner.caption(VIDEO, "image", max_new_tokens=TOKENS)
    assert status == 200 and answer["caption"] == expected.caption
    assert answer["frame"].startswith("data:image/jpeg;base64,")


def test_errors_name_the_upload_never_a_server_path(server, tmp_path):
    status, answer = post(server, "../../etc/notes.mp4", b"\x00\x00\x00\x18ftypmp42 junk" * 20)
    assert status == 422 and answer["file"] == "notes.mp4"
    assert answer["error"] and "/" not in answer["error"].replace("notes.mp4", "")
    assert "dalipipe-serve" not in json.dumps(answer)
    status, answer = post(server, WAV16K.name, WAV16K.read_bytes(), modality="image")
    assert (status, answer["error"]) == (
        422,
        "modality image needs a video stream, and the file has none",
    )
    status, answer = refused_before_the_body(server, MAX_UPLOAD + 2**20)
    assert status == 413 and answer["error"] == "the file is larger than 2 MB"
    status, answer = post(server, "big.wav", bytes(MAX_UPLOAD + 1024))  # within the form's slack
    assert (status, answer["file"]) == (413, "big.wav") and answer["error"] == "larger than 2 MB"
    status, answer = post(server, "a.wav", WAV16K.read_bytes(), modality="smell")
    assert status == 400 and answer["error"].startswith("modality 'smell': use one of")


def refused_before_the_body(url: str, length: int) -> tuple[int, dict]:
    """An upload announced larger than the bound is refused from its headers alone. The client
    asks `Expect: 100-continue` and waits, as curl does for a large body: a client that writes
    the body regardless races the server's close and may see a broken pipe instead of the 413."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("POST", "/caption")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Content-Length", str(length))
        connection.putheader("Expect", "100-continue")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium not installed")
def test_the_page_in_headless_chromium_shows_the_caption_and_the_frame(server, captioner):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            page.goto(server)
            assert page.title() == "dalipipe: describe a sound"
            page.set_input_files("#file", str(VIDEO))
            page.click("#submit")
            page.wait_for_selector("body[data-done='1']", timeout=120_000)
            assert page.text_content("#caption") == BEFORE[VIDEO]
            assert page.text_content("#how") == f"{VIDEO.name}, audio, greedy"
            assert page.is_hidden("#frame")

            page.select_option("#modality", "audio+image")
            page.click("#submit")
            page.wait_for_selector("body[data-done='2']", timeout=120_000)
            [expected] = captioner.caption(VIDEO, "audio+image", max_new_tokens=TOKENS)
            assert page.text_content("#caption") == expected.caption
            assert page.get_attribute("#frame", "src").startswith("data:image/jpeg;base64,")
            assert page.is_visible("#frame")

            page.set_input_files("#file", str(WAV16K))
            page.select_option("#modality", "image")
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent !== ''")
            assert page.text_content("#error") == (
                f"{WAV16K.name}: modality image needs a video stream, and the file has none"
            )
        finally:
            browser.close()


@pytest.mark.skipif(chromium() is None, reason="chromium not installed")
def test_a_sound_recorded_on_the_page_is_captioned(server):
    """Chromium's fake microphone (a beep) stands in for a person's; the page records it with
    MediaRecorder and sends it as recording.webm, which ffmpeg reads like any file."""
    sync_api = pytest.importorskip("playwright.sync_api")
    fake_microphone = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=["--no-sandbox", *fake_microphone]
        )
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            page.goto(server)
            page.click("#record")
            page.wait_for_function(
                "document.getElementById('status').textContent === 'Recording...'"
            )
            page.wait_for_timeout(2500)  # more than the 1 s of audio a caption needs
            page.click("#record")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('Recorded ')"
            )
            page.click("#submit")
            page.wait_for_selector("body[data-done='1']", timeout=120_000)
            assert page.text_content("#error") == ""
            assert page.text_content("#how") == "recording.webm, audio, greedy"
            assert page.text_content("#caption")  # a caption, whatever the beep gives
        finally:
            browser.close()
