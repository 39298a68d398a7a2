"""Reaching the Hugging Face hub, or knowing at once that it cannot be reached (these machines
often reach PyPI but not the hub): a quick TCP probe, and offline mode while it is down."""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection (a quick probe, no HTTP, no retries)."""

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable():
    """Hub offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) while the hub cannot be reached.

    Without it, ``datasets`` retries an unreachable hub for about half a minute per file before
    failing; offline, a dataset that is not in the local cache fails at once.
    """
    if hub_reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hc

    saved = (hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    hc.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
