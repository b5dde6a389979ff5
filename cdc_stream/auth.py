"""Authentication: static tokens and JWTs, and who may read which channel.

A token is taken from the `Authorization: Bearer` header, the `access_token`
query parameter (EventSource cannot set headers) or a cookie, in that order.
`CredentialScrubber` removes all three from the ASGI scope before the app
runs, so neither Hypercorn's access log nor the app can print them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

import jwt

from .authconfig import ALL_CHANNELS, AuthSettings

logger = logging.getLogger(__name__)

SCOPE_KEY = "cdc_stream.credential"
QUERY_PARAMETER = "access_token"
MAX_TOKEN_LENGTH = 8192
# A proxy in front of the app sets these; its requests may come from anywhere
# even when it connects over loopback.
FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class AccessError(Exception):
    """A request is not allowed; `status` is 401 or 403."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Credential:
    """A token presented with a request and where it came from."""

    token: str
    source: str


@dataclass(frozen=True)
class Principal:
    """The identity a request acts for, with the channels it may read and its claims."""

    name: str
    channels: frozenset[str]
    claims: Mapping[str, Any] = field(default_factory=dict)
    authenticated: bool = True

    @property
    def all_channels(self) -> bool:
        return ALL_CHANNELS in self.channels

    def may_read(self, channel: str) -> bool:
        return self.all_channels or channel in self.channels

    def has_claim(self, claim: str) -> bool:
        """Return whether the claim is present with a true value."""
        value = self.claims.get(claim)
        return value is not None and value is not False and value != "" and value != []


ANONYMOUS = Principal("anonymous", frozenset({ALL_CHANNELS}), {}, authenticated=False)


class CredentialScrubber:
    """ASGI middleware that moves the request's token out of the scope.

    It removes `access_token` from the query string, the Authorization
    header and the token cookie, and strips `access_token` from the Referer
    header, because Hypercorn's access log prints the scope that the app
    received. The token is kept under `SCOPE_KEY` for `Authenticator`.
    """

    def __init__(self, app: ASGIApp, cookie_name: str) -> None:
        self.app = app
        self.cookie_name = cookie_name

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scrub_scope(scope, self.cookie_name)
        await self.app(scope, receive, send)


def scrub_scope(scope: dict[str, Any], cookie_name: str) -> None:
    """Move the token of an HTTP scope to `scope[SCOPE_KEY]`, in place."""
    found: list[Credential] = []
    query = scope.get("query_string", b"")
    if query:
        scope["query_string"], tokens = _remove_parameter(query)
        found.extend(Credential(token, "query") for token in tokens)

    headers = []
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            found.insert(0, Credential(value.decode("latin-1"), "header"))
            continue
        if name == b"cookie":
            value, tokens = _remove_cookie(value, cookie_name)
            found.extend(Credential(token, "cookie") for token in tokens)
            if not value:
                continue
        if name == b"referer" and b"?" in value:
            value = _scrub_url(value)
        headers.append((name, value))
    scope["headers"] = headers
    scope[SCOPE_KEY] = found[0] if found else None


def _remove_parameter(query: bytes) -> tuple[bytes, list[str]]:
    # Works on the raw bytes, so the other parameters reach the app unchanged;
    # the name is unquoted first, so `access%5Ftoken` is caught too.
    kept: list[bytes] = []
    tokens: list[str] = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if _unquote(name) == QUERY_PARAMETER:
            tokens.append(_unquote(value))
        else:
            kept.append(part)
    return b"&".join(kept), tokens


def _unquote(text: bytes) -> str:
    return unquote_to_bytes(text.replace(b"+", b" ")).decode("utf-8", "replace")


def _remove_cookie(value: bytes, cookie_name: str) -> tuple[bytes, list[str]]:
    text = value.decode("latin-1")
    if cookie_name not in text:
        return value, []
    tokens: list[str] = []
    kept: list[str] = []
    for part in text.split(";"):
        name, _, content = part.strip().partition("=")
        if name == cookie_name:
            tokens.append(_cookie_value(part.strip()) or content)
        elif part.strip():
            kept.append(part.strip())
    return "; ".join(kept).encode("latin-1"), tokens


def _cookie_value(part: str) -> str | None:
    try:
        cookie = SimpleCookie(part)
    except CookieError:
        return None
    for morsel in cookie.values():
        return morsel.value
    return None


def _scrub_url(value: bytes) -> bytes:
    parts = urlsplit(value.decode("latin-1"))
    query, _ = _remove_parameter(parts.query.encode("latin-1"))
    return urlunsplit(parts._replace(query=query.decode("latin-1"))).encode("latin-1")


def is_loopback_request(scope: Mapping[str, Any]) -> bool:
    """Return whether the request came to a loopback address with no proxy.

    The address is the ASGI scope's `server`, the local end of the
    connection. A Unix socket, or a request with forwarding headers, counts as
    remote because a proxy may relay requests from anywhere through it.
    """
    server = scope.get("server")
    if not server or server[1] is None:
        return False
    try:
        loopback = ipaddress.ip_address(server[0]).is_loopback
    except ValueError:
        return False
    if not loopback:
        return False
    return not any(name in FORWARDING_HEADERS for name, _ in scope.get("headers", []))


class Authenticator:
    """Checks tokens against the configured static tokens and JWT keys."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._keys: dict[str, bytes] = {}
        if settings.jwt_secret is not None:
            self._keys["HS256"] = settings.jwt_secret
        if settings.jwt_public_key is not None:
            self._keys["RS256"] = settings.jwt_public_key
        self._warned = threading.Event()

    def authenticate(self, scope: Mapping[str, Any]) -> Principal:
        """Return the principal of a request scrubbed by `CredentialScrubber`."""
        credential: Credential | None = scope.get(SCOPE_KEY)
        loopback = is_loopback_request(scope)
        mode = self.settings.mode
        if not loopback and (mode == "open" or not self.settings.has_credentials):
            self._warn_open(mode)

        if credential is None or not self.settings.has_credentials:
            if mode == "open" or (mode == "auto" and loopback):
                return ANONYMOUS
            raise AccessError(401, "unauthorized", self._missing_message())
        return self.check_token(credential)

    def check_token(self, credential: Credential) -> Principal:
        """Return the principal of a token; raise AccessError (401) if invalid."""
        token = credential.token
        if credential.source == "header":
            scheme, _, token = token.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AccessError(
                    401,
                    "unauthorized",
                    "the Authorization header must be 'Bearer <token>'",
                )
            token = token.strip()
        if len(token) > MAX_TOKEN_LENGTH:
            raise AccessError(
                401, "unauthorized", f"token longer than {MAX_TOKEN_LENGTH} characters"
            )

        principal = self._static_token(token)
        if principal is not None:
            return principal
        if token.count(".") == 2 and self._keys:
            return self._jwt(token)
        raise AccessError(401, "unauthorized", "invalid token")

    def _static_token(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        match = None
        # Every configured hash is compared, so the time taken does not tell
        # which one, if any, shares a prefix with the digest.
        for candidate in self.settings.tokens:
            if hmac.compare_digest(candidate.sha256_hex, digest):
                match = candidate
        if match is None:
            return None
        claims = {claim: True for claim in match.claims}
        return Principal(match.name, match.channels, claims)

    def _jwt(self, token: str) -> Principal:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError:
            raise AccessError(401, "unauthorized", "malformed token") from None
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None:
            accepted = ", ".join(sorted(self._keys))
            raise AccessError(
                401,
                "unauthorized",
                f"token algorithm {algorithm!r} is not accepted: use {accepted}",
            )

        claims = self._decode(token, key, algorithm)
        return Principal(
            str(claims.get("sub", "jwt")), self._channels_of(claims), claims
        )

    def _decode(self, token: str, key: bytes, algorithm: str) -> dict[str, Any]:
        settings = self.settings
        required = ["exp"]
        if settings.audience is not None:
            required.append("aud")
        if settings.issuer is not None:
            required.append("iss")
        options = {"require": required, "verify_aud": settings.audience is not None}
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_seconds,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.MissingRequiredClaimError as error:
            message = f"token lacks the {error.claim!r} claim"
            raise AccessError(401, "unauthorized", message) from None
        except jwt.InvalidTokenError as error:
            raise AccessError(401, "unauthorized", _jwt_message(error)) from None

    def _channels_of(self, claims: Mapping[str, Any]) -> frozenset[str]:
        name = self.settings.channels_claim
        channels = claims.get(name, [])
        if isinstance(channels, str):
            channels = [channels]
        valid = isinstance(channels, list) and all(isinstance(c, str) for c in channels)
        if not valid:
            message = f"token claim {name!r} must be a list of channel names"
            raise AccessError(401, "unauthorized", message)
        return frozenset(channels)

    def _missing_message(self) -> str:
        if not self.settings.has_credentials:
            return (
                "authentication required, but the server has no tokens configured: "
                "configure [auth] tokens or a JWT key, or set [auth] mode = 'open'"
            )
        return (
            "authentication required: send 'Authorization: Bearer <token>', the "
            f"'{QUERY_PARAMETER}' query parameter or the "
            f"'{self.settings.cookie_name}' cookie"
        )

    def _warn_open(self, mode: str) -> None:
        if self._warned.is_set():
            return
        self._warned.set()
        if mode == "open":
            logger.warning(
                "SERVING WITHOUT AUTHENTICATION: [auth] mode is 'open' and a "
                "request arrived on a non-loopback address; anyone who can reach "
                "this server reads every channel"
            )
        else:
            logger.warning(
                "NO TOKENS CONFIGURED while serving a non-loopback address: such "
                "requests are rejected with 401. Configure [auth] tokens or a JWT "
                "key, or set [auth] mode = 'open' to serve without authentication"
            )


def authorize_channels(
    principal: Principal, requested: Iterable[str]
) -> frozenset[str]:
    """Return the channels to stream; raise AccessError (403) for a forbidden one.

    A request without channels gets every channel the principal may read.
    """
    requested = frozenset(requested)
    if not requested:
        if principal.all_channels:
            return frozenset()
        if not principal.channels:
            raise AccessError(403, "forbidden", "the token grants no channel")
        return principal.channels

    forbidden = sorted(
        channel for channel in requested if not principal.may_read(channel)
    )
    if forbidden:
        raise AccessError(
            403,
            "forbidden",
            f"the token may not read channel {forbidden[0]!r}",
            channels=forbidden,
        )
    return requested


# Messages for PyJWT's errors, most specific first; none repeats the token.
_JWT_MESSAGES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not valid yet (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "token audience is not accepted"),
    (jwt.InvalidIssuerError, "token issuer is not accepted"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.DecodeError, "malformed token"),
)


def _jwt_message(error: Exception) -> str:
    for kind, message in _JWT_MESSAGES:
        if isinstance(error, kind):
            return message
    return "invalid token"
