"""Fixtures: tiny SavedModels on disk and model servers run as subprocesses."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                                      # the helpers below
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))    # the repo (package `serving`)
import serving_models  # noqa: E402
from serving_harness import Server  # noqa: E402


@pytest.fixture(scope="session")
def templates(tmp_path_factory):
    """Built once: v1 (scale 1), v2 (scale 2) SavedModel directories."""
    root = tmp_path_factory.mktemp("templates")
    return {
        1: serving_models.build_model(str(root / "v1"), scale=1.0),
        2: serving_models.build_model(str(root / "v2"), scale=2.0),
    }


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(*flags) -> ready Server; stopped (SIGTERM) afterwards."""
    servers = []

    def start(*args, wait=True):
        server = Server(list(args), str(tmp_path / f"server{len(servers)}.log"))
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        rc = server.terminate()
        assert rc == 0, f"server exit code {rc}:\n{server.log()}"
