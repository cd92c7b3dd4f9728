"""Whether a Hugging Face Hub id can be fetched now, asked once and quickly.

huggingface_hub retries a request that is refused or times out five times with backoff (about 23 s a file;
transformers' AutoTokenizer asks for two files), so an unreachable hub cost ~50 s before its error. One HEAD
without retries answers the same question at once; a reachable hub is then left to download as before.
"""


def hub_unreachable_reason(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """None when the hub answers (any HTTP status: a missing or gated repo is for the download to report);
    else why it cannot be asked: HF_HUB_OFFLINE, or the request failing before any answer."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:   # the hub's own timeout for this request (HF_HUB_ETAG_TIMEOUT, 10 s unless set)
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (HfHubHTTPError, ValueError):   # a server answered, or the id is malformed: the download says which
        return None
    except Exception as e:   # refused, no DNS, timed out, a proxy failing: whichever transport the hub client uses
        return f"the Hugging Face Hub at {constants.ENDPOINT} could not be reached ({e or type(e).__name__})"
    return None
