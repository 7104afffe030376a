"""The default pipeline never opens a network connection (SPEC section 6: offline by default).

The reference run executes all five stages as subprocesses with a
sitecustomize.py that replaces the socket module's connecting functions by a
recorder that refuses; AF_UNIX sockets stay allowed (they never leave the
machine). A control run checks that the recorder does catch an attempt, so
an empty record means something.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from stagerun import PYTHON, offline_env


@pytest.mark.slow
def test_all_stages_make_no_connection_attempt(reference_run):
    attempts = reference_run.connections.read_text().splitlines() if reference_run.connections.exists() else []
    assert attempts == []
    # and the stages did run offline for real, not fail early
    assert all("done in" in log for log in reference_run.logs.values())


@pytest.mark.slow
def test_the_blocker_records_and_refuses_tcp_but_allows_unix_sockets(tmp_path):
    log = tmp_path / "connections.jsonl"
    env = offline_env(tmp_path, tmp_path / "netblock", log)
    script = (
        "import socket, urllib.request\n"
        "a, b = socket.socketpair(socket.AF_UNIX)\n"
        "a.sendall(b'x'); assert b.recv(1) == b'x'\n"
        "try:\n"
        "    urllib.request.urlopen('http://example.org/', timeout=1)\n"
        "except OSError as err:\n"
        "    print('refused:', err)\n"
        "try:\n"
        "    socket.socket().connect(('127.0.0.1', 9))\n"
        "except OSError as err:\n"
        "    print('refused:', err)\n"
    )
    result = subprocess.run([PYTHON, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["create_connection", "connect"]  # urllib goes through create_connection
    assert "example.org" in calls[0]["target"] and "127.0.0.1" in calls[1]["target"]
    assert result.stdout.count("network blocked by the test") == 2
