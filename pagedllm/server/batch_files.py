"""run-batch's input and output: a local path, or an http(s) URL as vLLM's run-batch takes them (the input read
with GET, the output sent with PUT, as to a presigned object-store URL).

The input is read before the model loads, so a bad URL costs nothing. The output goes up once every request is
answered: staged in --output-tmp-dir when given (vLLM's flag, for outputs too large to hold in memory), else in
memory; the PUT is tried UPLOAD_TRIES times (vLLM's count and delay), and a file staged in --output-tmp-dir is
kept when every try fails, so hours of answers are not lost to a network error.
"""
import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("pagedllm")

UPLOAD_TRIES = 5
UPLOAD_DELAY_S = 5.0
UPLOAD_TIMEOUT_S = 1000.0   # vLLM's: large files take longer than a client's default


def is_url(path_or_url: str) -> bool:
    return path_or_url.startswith(("http://", "https://"))


def read_input(path_or_url: str) -> str:
    """The input's text: a local file, or the body of a GET of the URL (a non-2xx answer is an error)."""
    if not is_url(path_or_url):
        return Path(path_or_url).read_text(encoding="utf-8")
    import httpx
    try:
        response = httpx.get(path_or_url, follow_redirects=True, timeout=UPLOAD_TIMEOUT_S)
        response.raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"--input-file {path_or_url!r} could not be read: {e}") from None
    return response.content.decode("utf-8")


def check_output_tmp_dir(output_tmp_dir: str | None):
    """A staging directory that cannot be used is found before the model loads, not after every request ran."""
    if output_tmp_dir is not None and not os.path.isdir(output_tmp_dir):
        raise ValueError(f"--output-tmp-dir {output_tmp_dir!r} is not a directory")


def upload_output(url: str, text: str, output_tmp_dir: str | None):
    """PUTs the output to url, staged in output_tmp_dir when given (removed once sent, kept if not)."""
    if output_tmp_dir is None:
        logger.info("run-batch: uploading the output to %s", url)
        _put(url, lambda: text.encode("utf-8"))
        return
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=output_tmp_dir, prefix="tmp_batch_output_",
                                     suffix=".jsonl", delete=False) as f:
        f.write(text)
    logger.info("run-batch: output staged in %s, uploading it to %s", f.name, url)
    try:
        _put(url, lambda: open(f.name, "rb"))
    except RuntimeError as e:
        raise RuntimeError(f"{e}; the output is kept in {f.name}") from None
    os.unlink(f.name)


def _put(url: str, content):
    """content: a callable giving the bytes or a fresh file for each try."""
    import httpx
    error = None
    for attempt in range(1, UPLOAD_TRIES + 1):
        body = content()
        try:
            response = httpx.put(url, content=body, timeout=UPLOAD_TIMEOUT_S)
            if response.is_success:
                return
            error = f"status {response.status_code}: {response.text[:500]}"
        except httpx.HTTPError as e:
            error = str(e) or type(e).__name__
        finally:
            if hasattr(body, "close"):
                body.close()
        if attempt < UPLOAD_TRIES:
            logger.error("run-batch: upload to %s failed (try %d of %d): %s; retrying in %.0f s", url, attempt,
                         UPLOAD_TRIES, error, UPLOAD_DELAY_S)
            time.sleep(UPLOAD_DELAY_S)
    raise RuntimeError(f"--output-file {url!r}: the upload failed {UPLOAD_TRIES} times, last: {error}")
