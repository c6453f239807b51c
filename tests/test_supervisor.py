"""The supervisor's process handling, on a stand-in server (a few lines of ``http.server``).

The server runs in its own process group (so that what it leaves behind is
reaped with it) but in the supervisor's session: a session of its own puts
it in a scheduler autogroup of its own on Linux, where the defended server
held its streams back for seconds at a time (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import pytest

from distillgame.server.supervisor import ServerCommand, ServerSupervisor

STAND_IN = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def supervised():
    port = _free_port()
    command = ServerCommand(argv=[sys.executable, "-c", STAND_IN, str(port)], env=dict(os.environ),
                            health_url=f"http://127.0.0.1:{port}/health", poll_s=0.1, restart_delay_s=0.2)
    supervisor = ServerSupervisor(command)
    codes: list[int] = []
    # run() installs signal handlers, which only the main thread may do: stand them in for the thread.
    original = signal.signal
    signal.signal = lambda sig, handler: signal.getsignal(sig)
    thread = threading.Thread(target=lambda: codes.append(supervisor.run()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (supervisor._run and supervisor._run.ready.is_set()):
            assert time.monotonic() < deadline, "the stand-in server never became ready"
            time.sleep(0.05)
        yield supervisor, codes, thread
    finally:
        supervisor.stop()
        thread.join(timeout=30)
        signal.signal = original


def test_server_has_its_own_process_group_in_the_supervisors_session(supervised):
    supervisor, _, _ = supervised
    pid = supervisor._run.proc.pid
    assert os.getpgid(pid) == pid != os.getpgid(0)
    assert os.getsid(pid) == os.getsid(0)


def test_a_server_that_dies_is_restarted_and_a_stop_exits_zero(supervised):
    supervisor, codes, thread = supervised
    first = supervisor._run.proc.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (supervisor._run.proc.pid != first and supervisor._run.ready.is_set()):
        assert time.monotonic() < deadline, "the server was not restarted"
        time.sleep(0.05)
    assert supervisor.restarts == 1
    second = supervisor._run.proc.pid
    supervisor.stop()
    thread.join(timeout=30)
    assert codes == [0]
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
