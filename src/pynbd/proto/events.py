"""The events both roles' cores give their drivers alike."""

from __future__ import annotations

from dataclasses import dataclass


class NeedData:
    """The type of :data:`NEED_DATA`."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The core needs more bytes from the peer before it can say anything more.
NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS was agreed: the driver upgrades the stream to TLS, then tells the core
    with its ``tls_established()``."""


__all__ = ["NEED_DATA", "NeedData", "StartTLS"]
