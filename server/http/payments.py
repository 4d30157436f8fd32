"""Payment providers: what confirms that a fan paid for a bundle.

A provider confirms (or declines) the payment named by ``payment_ref``; the
server then credits the bundle exactly once per ``payment_ref``. Real
providers (card processors, app stores) implement ``PaymentProvider``; the
``fake`` one approves every reference except those starting with
``declined`` and exists for development and tests only.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import Forbidden, Unavailable


class PaymentDeclined(Forbidden):
    """The provider refused the payment: nothing is credited."""


class PaymentProvider(Protocol):
    name: str

    async def confirm(self, user_id: str, bundle: str, price_cents: int, payment_ref: str) -> None:
        """Return when the payment is confirmed; raise ``PaymentDeclined`` or
        ``Unavailable``. Called again for a retried ``payment_ref``, so it must
        be idempotent on it (providers' payment ids are)."""
        ...


class FakeProvider:
    name = "fake"

    async def confirm(self, user_id: str, bundle: str, price_cents: int, payment_ref: str) -> None:
        if payment_ref.startswith("declined"):
            raise PaymentDeclined(f"payment '{payment_ref}' was declined")


class NoProvider:
    name = "none"

    async def confirm(self, user_id: str, bundle: str, price_cents: int, payment_ref: str) -> None:
        raise Unavailable("no payment provider is configured (TOKENCHAT_PAYMENT_PROVIDER)")


def provider_named(name: str) -> PaymentProvider:
    providers: dict[str, PaymentProvider] = {"fake": FakeProvider(), "none": NoProvider()}
    return providers[name]
