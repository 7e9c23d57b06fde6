"""MONAI Label authentication that actually admits valid tokens.

MONAI Label 0.8.5 (``MONAI_LABEL_AUTH_ENABLE=true``) checks bearer tokens against the public key of a
Keycloak realm (``MONAI_LABEL_AUTH_REALM_URI``) and grants endpoints by realm role. Its token check
calls ``jwt.decode`` without ``algorithms``, which PyJWT 2 refuses: every request, valid token or not,
gets 401. This module replaces that one function with one that names the accepted signature
algorithms (asymmetric only, ``REVSEG_AUTH_ALGORITHMS``, default Keycloak's RS256) and reads the
same claims, so the roles (user, annotator, reviewer, admin) work as MONAI Label documents them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from monailabel.config import settings
from monailabel.endpoints.user import auth

log = logging.getLogger(__name__)

ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def accepted_algorithms(text: str | None = None) -> list[str]:
    """The configured signature algorithms; symmetric ones are refused (the key is a public key)."""
    names = [a.strip() for a in (text or os.environ.get("REVSEG_AUTH_ALGORITHMS", "RS256")).split(",") if a.strip()]
    bad = [a for a in names if a not in ASYMMETRIC]
    if bad or not names:
        raise ValueError(f"REVSEG_AUTH_ALGORITHMS: {bad or names} not allowed; choose from {list(ASYMMETRIC)}")
    return names


def claim(payload: Mapping[str, Any], path: str) -> Any:
    """A claim by MONAI Label's ``a#b`` path notation (``realm_access#roles``)."""
    value: Any = payload
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def user_from_payload(payload: Mapping[str, Any]) -> auth.User:
    roles = claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES) or []
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise jwt.InvalidTokenError("the roles claim must be a list of names")
    return auth.User(username=str(claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
                     email=claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                     name=claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_NAME), roles=roles)


def token_checker(algorithms: Sequence[str]):
    def from_token(token: str) -> auth.User:
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return auth.DEFAULT_USER
        key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
        try:
            payload = jwt.decode(token, key, algorithms=list(algorithms), options={
                "verify_signature": True, "verify_aud": False, "verify_exp": True, "require": ["exp"]})
            return user_from_payload(payload)
        except (jwt.PyJWTError, ValueError, TypeError) as error:  # a bad key type or claim is a bad token: 401
            raise jwt.InvalidTokenError(str(error)) from error

    return from_token


def install_token_check() -> None:
    """Use the fixed token check in this server process (no-op while authentication is off)."""
    if settings.MONAI_LABEL_AUTH_ENABLE:
        algorithms = accepted_algorithms()
        auth.from_token = token_checker(algorithms)
        log.info("authentication on: realm %s, algorithms %s", settings.MONAI_LABEL_AUTH_REALM_URI, algorithms)
