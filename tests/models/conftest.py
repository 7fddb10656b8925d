"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module (exactness tests compare numbers that thread
    counts can move), restored afterwards. Modules opt in with ``pytestmark``."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> list:
    """HF_HUB_OFFLINE=1 set after huggingface_hub was imported (the hard case: it reads the
    variable once, at import), an empty Hugging Face cache, and every socket refused. Returns
    the list of attempted connections, which must stay empty."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts
