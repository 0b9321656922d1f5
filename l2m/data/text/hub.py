"""Fail fast when the Hugging Face hub cannot be reached, and tell hub ids from local paths.

Left alone, datasets and huggingface_hub retry an unreachable hub for about 20 s before
giving up; a short TCP probe answers in milliseconds (DNS failure) or a few seconds.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: only the local Hugging Face cache is used."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; a direct probe would wrongly fail

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_local_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a name that is not on disk was meant as a local path: hub ids are "name" or
    "owner/name", so anything starting with . / ~, with more than one separator, or ending in one of
    `suffixes` (file types) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(suffixes)
