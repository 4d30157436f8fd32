"""Payment providers: what confirms that a fan paid for a bundle.

A provider confirms (or declines) the payment named by ``payment_ref``; the
server then credits the bundle exactly once per ``payment_ref``. Real
providers (card processors, app stores) implement ``PaymentProvider``; the
``fake`` one approves every reference except those starting with
``declined`` and exists for development and tests only.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Protocol

from ..errors import Forbidden, Unauthenticated, Unavailable


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


# --- webhooks (POST /v1/payments/webhook; server/http/accounts.py) -----------------------
# Shaped like Stripe's: the provider signs `"<t>.<raw body>"` with HMAC-SHA256
# under the shared webhook secret and sends `Payment-Signature: t=<unix
# seconds>,v1=<hex>` (several v1 entries while it rolls its secret).
SIGNATURE_HEADER = "payment-signature"
SIGNATURE_HEADER_LEN_MAX = 1024  # characters: a timestamp and a few digests
EVENT_CONFIRMED = "payment.confirmed"  # Stripe: payment_intent.succeeded
EVENT_REFUNDED = "payment.refunded"  # Stripe: charge.refunded
EVENT_CHARGED_BACK = "payment.charged_back"  # Stripe: charge.dispute.created
EVENT_TYPES = (EVENT_CONFIRMED, EVENT_REFUNDED, EVENT_CHARGED_BACK)


def sign_webhook(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header a provider sends with ``body`` (tests, the fake
    provider, the load test)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_webhook(
    secret: str, header: str | None, body: bytes, tolerance_s: int, now_s: float | None = None
) -> None:
    """Return if ``header`` signs ``body`` under ``secret`` within the
    tolerance; raise ``Unauthenticated`` else (nothing is applied). The
    timestamp is signed too, so an old capture cannot be re-dated."""
    if not secret:
        raise Unavailable("payment webhooks are not configured (TOKENCHAT_PAYMENT_WEBHOOK_SECRET)")
    if not header or len(header) > SIGNATURE_HEADER_LEN_MAX:
        raise Unauthenticated("send Payment-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise Unauthenticated("the Payment-Signature header needs t= and v1=")
    now = time.time() if now_s is None else now_s
    if abs(now - timestamp) > tolerance_s:
        raise Unauthenticated(f"the webhook's timestamp is more than {tolerance_s} s from now")
    expected = sign_webhook(secret, body, timestamp).partition(",v1=")[2]
    # Constant-time: the comparison's duration tells nothing about the digest.
    if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures):
        raise Unauthenticated("the webhook's signature does not match")
