"""The Python client of eventbus: asyncio-native (grpclib), usable from trio through
trio-asyncio.

    async with Client("127.0.0.1:9091") as client:
        async with client.publisher() as publisher:
            message_id = await publisher.publish(queue="orders", data=b"...")
        async with client.subscribe("orders", handle):
            ...

See the README's "Python client" section.
"""

from .client import Client
from .errors import PublishError, RpcError
from .messages import Message, OutboundMessage, PublishResult, ReceivedMessage
from .publisher import Publisher
from .retry import RETRYABLE
from .subscriber import Handler, Subscription
from .v1 import V1, V1Message

__all__ = [
    "RETRYABLE",
    "V1",
    "Client",
    "Handler",
    "Message",
    "OutboundMessage",
    "PublishError",
    "PublishResult",
    "Publisher",
    "ReceivedMessage",
    "RpcError",
    "Subscription",
    "V1Message",
]
