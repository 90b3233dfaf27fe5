"""Fixtures of the distributed tests: a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, Any] | None]:
    """A moto S3 server on 127.0.0.1 (a real HTTP server, not a client mock) and a fresh bucket URL."""
    try:
        import boto3
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.skip("needs moto[server], boto3 and s3fs (pip install 'ckptfmt[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "url": f"s3://{bucket}/run/step-1"}
    finally:
        server.stop()
