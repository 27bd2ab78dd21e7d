"""What a registry's ``WWW-Authenticate`` challenge says: its scheme and parameters (realm,
service, scope, error). Read by the token handshake and by the reading of a refusal."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["parse_challenge"]

#: One item of a ``WWW-Authenticate`` value: an auth-param (``name=value``, the value quoted or
#: not) or, where no ``=`` follows, the scheme that starts a challenge.
_CHALLENGE_ITEM_RE: Final = re.compile(r'([A-Za-z0-9_.!#$%&\'*+^`|~-]+)(?:\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*)))?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme, params) of a ``WWW-Authenticate`` value; scheme in lower case. A value may hold
    several challenges (``Basic realm=…, Bearer realm=…``, or two header lines, which httpx
    joins with a comma): Bearer is taken where there is one, else Basic, else the first."""
    challenges: list[tuple[str, dict[str, str]]] = []
    for match in _CHALLENGE_ITEM_RE.finditer(header):
        name, quoted, bare = match.groups()
        if quoted is None and bare is None:
            challenges.append((name.lower(), {}))
        elif challenges:
            challenges[-1][1][name.lower()] = quoted if quoted is not None else bare
    for wanted in ("bearer", "basic"):
        for scheme, params in challenges:
            if scheme == wanted:
                return scheme, params
    return challenges[0] if challenges else ("", {})
