"""The few S3 calls NIXL's OBJ plugin cannot make: HEAD bucket (probe at open) and DELETE object.

NIXL reads, writes and HEADs objects, but has no delete, and its errors do not say whether a
failure was a refused connection, bad credentials or a missing bucket. These two requests are
signed with AWS Signature Version 4 over :mod:`http.client`, so the tier needs no S3 SDK.

Credentials come from the tier's options, else from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``); without any, requests go unsigned.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

__all__ = ["S3Rest", "S3Target"]

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class S3Target:
    """Where the bucket is and how to sign for it."""

    bucket: str
    region: str
    scheme: str
    endpoint: str | None  # URL or host[:port]; None = AWS
    virtual: bool
    access_key: str | None
    secret_key: str | None
    session_token: str | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._netloc()}"

    def _netloc(self) -> str:
        if self.endpoint:
            parts = urlsplit(self.endpoint if "://" in self.endpoint else f"//{self.endpoint}")
            host = parts.netloc
        else:
            host = f"s3.{self.region}.amazonaws.com"
        return f"{self.bucket}.{host}" if self.virtual else host

    def path(self, key: str | None) -> str:
        base = "" if self.virtual else f"/{self.bucket}"
        return f"{base}/{quote(key, safe='/-_.~')}" if key else (base or "/")


class S3Rest:
    """Signed HEAD-bucket and DELETE-object requests; one short-lived connection per call.

    Raises ``OSError`` / ``http.client.HTTPException`` for transport failures (the caller maps
    them); HTTP statuses are returned, not raised.
    """

    def __init__(self, target: S3Target, *, timeout_s: float = 5.0) -> None:
        if target.access_key is None:
            target = S3Target(
                target.bucket, target.region, target.scheme, target.endpoint, target.virtual,
                os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                os.environ.get("AWS_SESSION_TOKEN"),
            )
        self.target = target
        self.timeout_s = timeout_s

    def head_bucket(self) -> int:
        """The HTTP status of HEAD on the bucket (200 fine, 403 credentials, 404 no bucket)."""
        conn = self._connect()
        try:
            return self._send(conn, "HEAD", None)
        finally:
            conn.close()

    def object_size(self, key: str) -> int | None:
        """HEAD an object: its size, or None if it does not exist; OSError-like for other statuses."""
        conn = self._connect()
        try:
            path = self.target.path(key)
            conn.request("HEAD", path, headers=self._sign("HEAD", path))
            resp = conn.getresponse()
            resp.read()
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise http.client.HTTPException(f"HEAD {key} answered HTTP {resp.status}")
            return int(resp.getheader("Content-Length", "0"))
        finally:
            conn.close()

    def delete(self, keys: Iterable[str]) -> list[int]:
        """DELETE each object (absent ones answer 204 or 404); the statuses, in order."""
        conn = self._connect()
        try:
            return [self._send(conn, "DELETE", key) for key in keys]
        finally:
            conn.close()

    # -- machinery ---------------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        netloc = self.target._netloc()
        cls = http.client.HTTPSConnection if self.target.scheme == "https" else http.client.HTTPConnection
        return cls(netloc, timeout=self.timeout_s)

    def _send(self, conn: http.client.HTTPConnection, method: str, key: str | None) -> int:
        path = self.target.path(key)
        headers = self._sign(method, path)
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        resp.read()  # drain, so the connection can carry the next request
        return resp.status

    def _sign(self, method: str, path: str) -> dict[str, str]:
        t = self.target
        host = t._netloc()
        now = datetime.datetime.now(datetime.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {"Host": host, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": amz_date}
        if t.session_token:
            headers["x-amz-security-token"] = t.session_token
        if not (t.access_key and t.secret_key):
            return headers
        signed = sorted(k.lower() for k in headers)
        values = {k.lower(): v.strip() for k, v in headers.items()}
        canonical = "\n".join([
            method, path, "",
            "".join(f"{k}:{values[k]}\n" for k in signed),
            ";".join(signed), _EMPTY_SHA256,
        ])
        scope = f"{day}/{t.region}/s3/aws4_request"
        to_sign = "\n".join([
            "AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest(),
        ])
        key = f"AWS4{t.secret_key}".encode()
        for part in (day, t.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={t.access_key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}"
        )
        return headers
