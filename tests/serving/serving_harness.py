"""Test harness: free ports, atomic version installs, a server subprocess with clients."""
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
from tensorflow_serving.apis import get_model_status_pb2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_version(template: str, base_path: str, version: int) -> str:
    """Copies a version in atomically (copy to a hidden name, then rename)."""
    os.makedirs(base_path, exist_ok=True)
    tmp = os.path.join(base_path, f".tmp-{version}")
    shutil.copytree(template, tmp)
    final = os.path.join(base_path, str(version))
    os.rename(tmp, final)
    return final


class Server:
    """A running ``python -m serving`` subprocess and clients for it."""

    def __init__(self, args, log_path, data_limit_bytes=None):
        """``data_limit_bytes``: the server's RLIMIT_DATA (heap and anonymous
        mappings), to show what a request does to a memory-bounded server."""
        self.grpc_port, self.rest_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "serving", f"--port={self.grpc_port}",
               f"--rest_api_port={self.rest_port}", "--host=127.0.0.1",
               "--tensorflow_intra_op_parallelism=1",
               "--tensorflow_inter_op_parallelism=1", *args]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log_path = log_path
        self._log = open(log_path, "wb")
        limit = None if data_limit_bytes is None else (
            lambda: resource.setrlimit(resource.RLIMIT_DATA, (data_limit_bytes,) * 2))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=limit)
        self.channel = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def wait_ready(self, timeout=90.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.url + "/v1/models/__ready_probe__", timeout=1)
            except urllib.error.HTTPError:
                break   # any HTTP answer means the server is up
            except OSError:
                time.sleep(0.2)
                continue
        else:
            raise RuntimeError(f"server not ready:\n{self.log()}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        return self

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def stubs(self):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
        return (prediction_service_pb2_grpc.PredictionServiceStub(self.channel),
                model_service_pb2_grpc.ModelServiceStub(self.channel))

    def http(self, method, path, body=None, raw=None):
        """(status, parsed JSON or text) for a REST call."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def terminate(self, timeout=60) -> int:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(args, log_path):
    """A started Server for the block; it must exit cleanly (code 0) afterwards.
    It is stopped however the block ends (a failed assertion must not leave
    a server running after the test run)."""
    srv = Server(args, log_path)
    try:
        srv.wait_ready()
        yield srv
    except BaseException:
        srv.terminate()
        raise
    rc = srv.terminate()
    assert rc == 0, f"server exit code {rc}:\n{srv.log()}"


def statuses(models, name="m"):
    """version -> ModelVersionStatus from GetModelStatus."""
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = name
    return {s.version: s for s in models.GetModelStatus(req, timeout=10).model_version_status}


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
