"""`dalipipe serve`: a local web page that captions a sound or a video with a trained captioner.

    dalipipe serve --model results/miniature/distill/ot_att            # http://127.0.0.1:8000
    dalipipe serve --model owner/name@revision --host 0.0.0.0 --port 7860 --max-upload-mb 20

Built on Starlette and uvicorn (`pip install 'dalipipe[serve]'`). The page (`page.py`) posts
one file and a modality to /caption and shows the answer: the caption and how it was decoded,
or the error, and for an image modality the frame the captioner saw. An upload larger than
--max-upload-mb is refused before it is read; the file goes to a private temporary folder that is
removed after its caption, and answers never carry a path of the server's disk (an error names
the file as the browser sent its name). Captions are made one request at a time, so the model
(on a GPU: its memory) serves a single caption at once; the captions are those
`dalipipe caption` gives for the same file, model and decoding.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from dalipipe.common import setup_logging
from dalipipe.data.local import MEDIA_EXTENSIONS
from dalipipe.describe.caption import add_model_arguments, decoding_arguments, load
from dalipipe.describe.captioner import MODALITIES
from dalipipe.describe.page import PAGE

log = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"[^\w.+ -]+")


def shown_name(filename: str | None) -> str:
    """The name an answer uses for an upload: the browser's file name without any folder."""
    name = SAFE_NAME.sub("_", Path((filename or "upload").replace("\\", "/")).name)
    return name[:120] or "upload"


def frame_url(frame) -> str:
    buffer = io.BytesIO()
    frame.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def build_app(captioner, decoding: dict, *, max_upload_bytes: int, model_name: str):
    """The Starlette application: GET / (the page), POST /caption (multipart: file, modality)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    page = PAGE.replace("{model}", html.escape(model_name))
    page = page.replace("{max_mb}", f"{max_upload_bytes / 2**20:g}")
    one_at_a_time = threading.Lock()

    def refuse(status: int, message: str, name: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message} | ({"file": name} if name else {}), status)

    def describe(path: Path, modality: str) -> dict:
        with one_at_a_time:
            [record] = captioner.caption(path, modality, **decoding)
        answer = record.to_dict()
        if record.frame is not None:
            answer["frame"] = frame_url(record.frame)
        return answer

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def caption(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return refuse(411, "the upload must state its length")
        if int(length) > max_upload_bytes + 64 * 1024:  # the form's fields around the file
            return refuse(413, f"the file is larger than {max_upload_bytes / 2**20:g} MB")
        try:
            async with request.form(max_files=1, max_fields=4) as form:
                upload, modality = form.get("file"), form.get("modality", "audio")
                if upload is None or isinstance(upload, str):
                    return refuse(400, "no file in the form (field 'file')")
                name = shown_name(upload.filename)
                if modality not in MODALITIES:
                    return refuse(400, f"modality {modality!r}: use one of {MODALITIES}", name)
                if upload.size is not None and upload.size > max_upload_bytes:
                    return refuse(413, f"larger than {max_upload_bytes / 2**20:g} MB", name)
                suffix = Path(name).suffix.lower()
                folder = Path(tempfile.mkdtemp(prefix="dalipipe-serve-"))
                try:
                    path = folder / ("upload" + (suffix if suffix in MEDIA_EXTENSIONS else ""))
                    with open(path, "wb") as f:
                        await run_in_threadpool(shutil.copyfileobj, upload.file, f)
                    answer = await run_in_threadpool(describe, path, modality)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
        except Exception as err:  # a malformed form: say so, never the server's state
            log.warning("a request failed: %s: %s", type(err).__name__, err)
            return refuse(400, f"the upload could not be read ({type(err).__name__})")
        answer["file"] = name
        if "error" in answer:  # reasons may name the temporary file: the browser's name instead
            answer["error"] = answer["error"].replace(str(path), name).replace(str(folder), "")
            return JSONResponse(answer, 422)
        return JSONResponse(answer)

    routes = [Route("/", index), Route("/caption", caption, methods=["POST"])]
    return Starlette(routes=routes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dalipipe serve", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload, MB")
    args = parser.parse_args(argv)
    setup_logging(logging.INFO)
    try:
        import uvicorn
    except ImportError:
        print("dalipipe serve: error: needs `pip install 'dalipipe[serve]'`", file=sys.stderr)
        return 2
    captioner = load(args, "dalipipe serve")
    if captioner is None:
        return 2
    decoding = decoding_arguments(args)
    app = build_app(
        captioner,
        decoding,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        model_name=str(args.model),
    )
    log.info("decoding: %s", captioner.decoding.but(**decoding))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
