"""Signed tokens: what ``/token`` hands out and ``moorage login-password`` prints.

Tokens are ES256 JWTs (PyJWT over cryptography), signed with one P-256 key kept as a PKCS#8
PEM file (generated at the first start when none is configured, readable by its owner only).
Two kinds, told apart by their audience, so neither passes for the other:

- *access* tokens (audience ``moorage``), from ``/token``: the ``access`` claim lists the
  repositories they may pull, as the distribution token spec has it
  (``[{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]``);
- *login* tokens (audience ``moorage:login``), from ``moorage login-password``: accepted as the
  password of their user, the way ECR's ``get-login-password`` output is; never as a bearer.

Verification allows 5 s of clock skew (the process that checks a token issued it, or a
replica sharing its key and clock source), and remembers good tokens until they expire (ES256
verification costs about 0.1 ms; manifests are served in less).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.config import Settings

__all__ = ["SERVICE", "Grant", "TokenExpired", "TokenInvalid", "TokenKeys", "key_path"]

SERVICE: Final = "moorage"
ISSUER: Final = "moorage"
LOGIN_AUDIENCE: Final = "moorage:login"
#: Clock skew allowed when checking a token's expiry: the process that checks a token issued
#: it, or a replica sharing its key, so a few seconds (a token is valid for what it says). Its
#: issue times are not checked: a token this cache signed is not from the future, whatever a
#: clock stepped back since, or a replica's clock behind the issuer's, says.
LEEWAY: Final = 5
REMEMBERED_TOKENS: Final = 10_000
TokenKind = Literal["access", "login"]


class TokenInvalid(Exception):
    """A token that is malformed, forged, expired, or of the other kind."""


class TokenExpired(TokenInvalid):
    """A token this cache signed, of the kind asked for, whose time is up at ``expired_at``
    (seconds since the epoch)."""

    def __init__(self, expired_at: float) -> None:
        super().__init__("the token has expired")
        self.expired_at = expired_at


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token says: who (``""`` for anonymous) and which repositories."""

    user: str
    repositories: frozenset[str]
    expires_at: float
    #: The user's password version when the token was issued: a changed password (or a
    #: removed user) ends every token issued before.
    password_version: str = ""


class TokenKeys:
    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._public = key.public_key()
        self._verified: OrderedDict[str, Grant] = OrderedDict()

    @classmethod
    def load(cls, path: Path, *, create: bool) -> TokenKeys:
        """The key in ``path``; with ``create``, a new one is written there when it is missing.
        Raises ValueError naming the file when it is unreadable or not a P-256 key. Blocks."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(pem)
            with contextlib.suppress(FileExistsError):  # another replica was first: use its key
                os.link(temporary, path)
            temporary.unlink()
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise ValueError(f"cannot read the token signing key {path}: {exc.strerror}") from None
        except ValueError:
            raise ValueError(f"{path} is not a PEM private key (expected PKCS#8, unencrypted)") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
            raise ValueError(f"{path}: the token signing key must be an EC P-256 key (ES256)")
        return cls(loaded)

    @classmethod
    def for_settings(cls, settings: Settings) -> TokenKeys:
        """The configured key (which must exist), or the store's own, generated when missing."""
        configured = settings.auth.token_signing_key_file
        return cls.load(key_path(settings), create=configured is None)

    def issue(
        self,
        user: str,
        repositories: frozenset[str],
        lifetime: float,
        kind: TokenKind = "access",
        password_version: str = "",
    ) -> str:
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": user,
            "pwv": password_version,
            "aud": SERVICE if kind == "access" else LOGIN_AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "jti": secrets.token_hex(12),
        }
        if kind == "access":
            claims["access"] = [
                {"type": "repository", "name": name, "actions": ["pull"]} for name in sorted(repositories)
            ]
        return jwt.encode(claims, self._key, algorithm="ES256")

    def verify(self, token: str, kind: TokenKind = "access") -> Grant:
        remembered = self._verified.get(token) if kind == "access" else None
        if remembered is not None and remembered.expires_at > time.time() - LEEWAY:
            return remembered
        audience = SERVICE if kind == "access" else LOGIN_AUDIENCE
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=["ES256"],
                audience=audience,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_iat": False, "verify_nbf": False},
            )
        except jwt.ExpiredSignatureError:
            # Signed by this key (the signature is checked first), but its expiry is checked
            # before its audience and issuer: an expired token of the other kind is no such one.
            claims = jwt.decode(token, options={"verify_signature": False})
            if claims.get("aud") != audience or claims.get("iss") != ISSUER:
                raise TokenInvalid("the token is not valid here: it is of another kind") from None
            raise TokenExpired(float(claims["exp"])) from None
        except jwt.DecodeError:  # unreadable, or signed by another key: the decoder's words help no one
            raise TokenInvalid("the token is not one this cache issued") from None
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid(f"the token is not valid here: {exc}") from None
        repositories = frozenset(
            str(item.get("name"))
            for item in claims.get("access") or []
            if isinstance(item, dict) and item.get("type") == "repository" and "pull" in (item.get("actions") or [])
        )
        grant = Grant(str(claims["sub"]), repositories, float(claims["exp"]), str(claims.get("pwv", "")))
        if kind == "access":
            self._verified[token] = grant
            while len(self._verified) > REMEMBERED_TOKENS:
                self._verified.popitem(last=False)
        return grant


def key_path(settings: Settings) -> Path:
    """Where the token signing key is: ``auth.token_signing_key_file``, or the store's own."""
    return settings.auth.token_signing_key_file or settings.storage.path / "auth" / "token-key.pem"
