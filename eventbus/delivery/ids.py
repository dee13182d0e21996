"""Delivery ids that carry their own proof of origin.

A delivery id is a UUID (version 8, canonical text form): ten random bytes, then six bytes of
an HMAC-SHA256 of them (and, with authentication on, of the name of the identity the delivery
was handed to) under a key all nodes share (kept in PostgreSQL). An ack or nack of an id the
bus never issued is refused at once, so a client cannot fill the bookkeeping with settlements
of made-up ids; nor can one identity settle what was handed to another.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import Callable, Iterable

from ..backends.store import Store
from ..errors import InvalidArgument, PermissionDenied

KEY_NAME = "delivery_ids"
# 74 random bits (10 bytes less the version and variant bits): ids of a billion deliveries
# collide with a chance of about 1 in 40,000; 48 bits of HMAC: a made-up id passes with a
# chance of 1 in 2.8e14.
NONCE_BYTES = 10
VERSION_8 = 0x80  # in byte 6, high nibble
VARIANT_RFC = 0x80  # in byte 8, top two bits 10


class DeliveryIds:
    """Issues delivery ids and tells issued ones from made-up ones."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.owners: Callable[[], Iterable[str]] = tuple  # identity names, for check's refusals

    @classmethod
    async def load(cls, store: Store) -> DeliveryIds:
        """With the cluster's key, created by the migrations; waits on PostgreSQL."""
        key = await store.fetchval("SELECT key FROM cluster_keys WHERE name = $1", KEY_NAME)
        return cls(bytes(key))

    def issue(self, owner: str = "") -> str:
        """A new id, for a delivery handed to the identity named owner ("": nobody in
        particular, as with authentication off)."""
        nonce = bytearray(os.urandom(NONCE_BYTES))
        nonce[6] = VERSION_8 | (nonce[6] & 0x0F)
        nonce[8] = VARIANT_RFC | (nonce[8] & 0x3F)
        return str(uuid.UUID(bytes=bytes(nonce) + self._tag(bytes(nonce), owner)))

    def check(self, value: str, owner: str = "", *, name_other_owner: bool = True) -> str:
        """value, a canonical UUID (validate.delivery_id), if this bus issued it to owner;
        PermissionDenied if it issued it to another identity (found by trying each: batches,
        which only tell good ids from bad, pass name_other_owner=False); else InvalidArgument."""
        raw = uuid.UUID(value).bytes
        nonce, tag = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        if hmac.compare_digest(tag, self._tag(nonce, owner)):
            return value
        if name_other_owner and any(
            hmac.compare_digest(tag, self._tag(nonce, other)) for other in self.owners()
        ):
            raise PermissionDenied(
                f"identity {owner!r} may not ack, nack or extend delivery {value!r}: it was "
                "handed to another identity, and only that one may settle it"
            )
        raise InvalidArgument(f"id {value!r} was not issued by this bus")

    def _tag(self, nonce: bytes, owner: str) -> bytes:
        message = nonce + b"\0" + owner.encode() if owner else nonce
        return hmac.new(self._key, message, hashlib.sha256).digest()[: 16 - NONCE_BYTES]
