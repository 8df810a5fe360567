"""pytest fixtures: an in-process GCS emulator (gcp-storage-emulator) for gs:// tests.

Register with `pytest_plugins = ["tests.gcs_emulator"]` in tests/conftest.py, then ask for
`gcs_root` (a fresh `gs://bucket/<unique>` prefix per test) or `gcs_emulator` (the server).

The session fixture points gcsfs (`STORAGE_EMULATOR_HOST`, anonymous token, no HNS gRPC probe),
tensorstore (`TENSORSTORE_GCS_HTTP_URL`, test token) and etils.epath (no TensorFlow) at the
emulator. Worker processes spawned during the session inherit these variables.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "dermjax-test"


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    url: str  # http://127.0.0.1:PORT
    bucket: str

    @property
    def root(self) -> str:
        return f"gs://{self.bucket}"


def _with_generation_headers(server_mod):
    """The emulator's handlers, with media reads carrying `x-goog-generation` as real GCS's do.

    Without it tensorstore's OCDBT writer, re-reading a manifest, now and then fails with
    "Malformed StorageGeneration" (about 1 run in 12 without; 0 in 40 with).
    """
    from gcp_storage_emulator.handlers import objects

    def with_generation(handler):
        def handle(request, response, storage, *args, **kwargs):
            handler(request, response, storage, *args, **kwargs)
            params = request.params
            if "object_id" in params and response.status < 300:
                obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
                response["x-goog-generation"] = obj["generation"]

        return handle

    return tuple(
        (
            regex,
            {
                m: with_generation(h) if h in (objects.download, objects.get) else h
                for m, h in handlers.items()
            },
        )
        for regex, handlers in server_mod.HANDLERS
    )


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """Start the emulator on a free local port with one bucket; restore the environment after."""
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    env = {
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # read when gcsfs is first imported
        "FSSPEC_GCS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "EPATH_USE_TF": "false",
        "STORAGE_EMULATOR_HOST": "",
        "TENSORSTORE_GCS_HTTP_URL": "",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    original_handlers = server_mod.HANDLERS
    server_mod.HANDLERS = _with_generation_headers(server_mod)
    server = None
    try:
        pytest.importorskip("gcsfs")
        server = server_mod.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
        server.start()
        port = server._api._httpd.server_address[1]  # port 0 above: the OS picked a free one
        url = f"http://127.0.0.1:{port}"
        os.environ["STORAGE_EMULATOR_HOST"] = os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        yield GcsEmulator(url=url, bucket=BUCKET)
    finally:
        if server is not None:
            server.stop()
        server_mod.HANDLERS = original_handlers
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_root(gcs_emulator: GcsEmulator) -> str:
    """A gs:// prefix no other test uses, e.g. gs://dermjax-test/3f2a...; nothing is there yet."""
    return f"{gcs_emulator.root}/{uuid.uuid4().hex}"
