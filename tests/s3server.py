"""A real S3 protocol server on the loopback interface, for the remote tests and
``scripts/bench_remote.py``: moto's server mode (``python -m moto.server``) in a child process.

With ``auth=True`` the server checks signatures and IAM policies: the credentials in
:attr:`S3Server.env` belong to a user that may do anything except ``s3:GetObject`` on
``<bucket>/denied/*``, and unknown keys are refused — so "access denied" is the server's real answer.

Example:
    >>> with S3Server() as srv:                                         # doctest: +SKIP
    ...     srv.upload_dir(Path("ckpt"), "models/llama")
    ...     subprocess.run(["monoquant", "stream", "s3://bkt/models/llama", "out"], env=srv.env)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BUCKET = "bkt"
REGION = "us-east-1"

# the first actions go unauthenticated: they create the IAM user whose keys everything else uses
_SETUP_ACTIONS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, *, auth: bool = True, bucket: str = BUCKET):
        self.auth = auth
        self.bucket = bucket
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.key_id = "AKIAMONOQUANTTEST000"
        self.secret = "monoquant-test-secret-never-print"
        self.env: dict[str, str] = {}

    def base_env(self) -> dict[str, str]:
        """Everything a client needs, and nothing that could reach beyond 127.0.0.1."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def start(self) -> S3Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HTTP_PROXY", "HTTPS_PROXY"))}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_ACTIONS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() - t0 > 60:
                    self.stop()
                    raise RuntimeError("moto server did not start within 60 s") from None
                time.sleep(0.05)
        if self.auth:
            self._make_user()
        self.env = self.base_env()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="monoquant")
        key = iam.create_access_key(UserName="monoquant")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {
                    "Effect": "Deny",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{self.bucket}/denied/*",
                },
            ],
        }
        iam.put_user_policy(UserName="monoquant", PolicyName="monoquant", PolicyDocument=json.dumps(policy))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        # plain PUTs without streamed checksums: moto decodes aws-chunked bodies slowly
        cfg = Config(
            request_checksum_calculation="when_required", response_checksum_validation="when_required"
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            config=cfg,
        )

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Upload every file under ``local`` to ``s3://bucket/prefix/...``; returns that URL."""
        c = self.client()
        for p in sorted(local.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:  # one PUT per file (moto assembles multipart uploads slowly)
                    c.put_object(
                        Bucket=self.bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}", Body=f
                    )
        return self.url(prefix)

    def put(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
