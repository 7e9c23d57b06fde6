"""MONAI Label's authentication, switched on for a real server: who may read, annotate and administer.

Keycloak does not run here, so a stand-in realm on 127.0.0.1 publishes an RSA public key exactly where
MONAI Label reads it (``GET {MONAI_LABEL_AUTH_REALM_URI}`` -> ``{"public_key": ...}``); tokens are signed
with its private key, carrying Keycloak's claims. Everything else is the real server and app.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import jwt
import nibabel as nib
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lib.server_auth import accepted_algorithms
from tests.live_server import HOST, LiveServer, prepare_site
from tests.test_server import CONF

USER, ANNOTATOR, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-admin"


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Realm:
    """The part of a Keycloak realm MONAI Label talks to: its public key, served on 127.0.0.1."""

    def __init__(self) -> None:
        self.key = _rsa_key()
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        body = json.dumps({"realm": "revseg", "public_key": base64.b64encode(der).decode()}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://{HOST}:{self.server.server_address[1]}/realms/revseg"

    def claims(self, roles: list[str] | str, lifetime: float = 600) -> dict:
        now = int(time.time())
        return {"preferred_username": "dr.who", "email": "dr.who@example.org", "name": "Dr Who",
                "realm_access": {"roles": roles}, "iat": now, "exp": now + int(lifetime)}

    def token(self, roles: list[str] | str, key: rsa.RSAPrivateKey | None = None, lifetime: float = 600) -> str:
        return jwt.encode(self.claims(roles, lifetime), key or self.key, algorithm="RS256")

    def forged_hs256(self, roles: list[str]) -> str:
        """Algorithm confusion: HMAC-signed with the realm's public key as the secret (PyJWT will not make it)."""
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(self.claims(roles))}"
        signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"

    def unsigned(self, roles: list[str]) -> str:
        return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(self.claims(roles))}."


def _b64(part: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def secured(tiny_cohort: Path, round1_checkpoint: Path, tmp_path_factory) -> Iterator[tuple[LiveServer, Realm]]:
    realm = Realm()
    root = tmp_path_factory.mktemp("access")
    images = sorted((tiny_cohort / "images").glob("*.nii.gz"))[:1]
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri}
    with prepare_site(root, images, round1_checkpoint, CONF, env=env) as live:
        yield live, realm
    realm.server.shutdown()


def _call(live: LiveServer, method: str, path: str, token: str | None = None, body: bytes | None = None,
          content_type: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if content_type:
        headers["Content-Type"] = content_type
    request = Request(f"{live.url}{path}", data=body, method=method, headers=headers)
    try:
        with urlopen(request) as response:
            return response.status, response.read().decode()
    except HTTPError as error:
        return error.code, error.read().decode()


def _label_upload(live: LiveServer, tmp_path: Path) -> tuple[str, bytes, str]:
    image_path = sorted(live.studies.glob("*.nii.gz"))[0]
    reference = nib.load(str(image_path))
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.full(reference.shape, 6, np.uint8), reference.affine), str(label))
    boundary = "revsegauth"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="label.nii.gz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + label.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    return image_path.name.removesuffix(".nii.gz"), body, f"multipart/form-data; boundary={boundary}"


def test_tokens_and_roles_decide_access(secured, tmp_path: Path):
    live, realm = secured
    assert _call(live, "GET", "/info/")[0] == 401, "no token: refused"
    assert _call(live, "GET", "/info/", "not-a-jwt")[0] == 401
    assert _call(live, "GET", "/info/", realm.token([USER], key=_rsa_key()))[0] == 401, "signed by another key"
    assert _call(live, "GET", "/info/", realm.token([USER], lifetime=-60))[0] == 401, "expired"
    assert _call(live, "GET", "/info/", realm.forged_hs256([ADMIN]))[0] == 401, "HS256 with the public key"
    assert _call(live, "GET", "/info/", realm.unsigned([ADMIN]))[0] == 401, "alg none"
    assert _call(live, "GET", "/info/", realm.token(USER))[0] == 401, "roles must be a list"
    status, body = _call(live, "GET", "/info/", realm.token([USER]))
    assert status == 200 and json.loads(body)["name"] == "revseg", body

    image_id, upload, content_type = _label_upload(live, tmp_path)
    path = f"/datastore/label?image={image_id}&tag=final"
    status, body = _call(live, "PUT", path, realm.token([USER]), upload, content_type)
    assert status == 403 and ANNOTATOR in body, "a plain user may look but not submit labels"
    assert not (live.studies / "labels" / "final" / f"{image_id}.nii.gz").exists()
    status, body = _call(live, "PUT", path, realm.token([USER, ANNOTATOR]), upload, content_type)
    assert status == 200, body
    assert (live.studies / "labels" / "final" / f"{image_id}.nii.gz").is_file()

    status, body = _call(live, "DELETE", "/train/", realm.token([USER, ANNOTATOR]))
    assert status == 403 and ADMIN in body, "only admins stop training"
    assert _call(live, "DELETE", "/train/", realm.token([ADMIN]))[0] == 200
    assert live.running


def test_symmetric_algorithms_are_refused_in_config():
    assert accepted_algorithms("RS256,ES256") == ["RS256", "ES256"]
    with pytest.raises(ValueError, match="HS256"):
        accepted_algorithms("HS256")
