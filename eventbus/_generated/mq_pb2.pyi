# Generated from protos/mq.proto by scripts/generate_protos.py. Do not edit.
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PublishRequest(_message.Message):
    __slots__ = ("queue", "data", "ExpirationSeconds")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXPIRATIONSECONDS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    data: str
    ExpirationSeconds: int
    def __init__(self, queue: _Optional[str] = ..., data: _Optional[str] = ..., ExpirationSeconds: _Optional[int] = ...) -> None: ...

class DelayPublishRequest(_message.Message):
    __slots__ = ("queue", "data", "delaySeconds", "ExpirationSeconds")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DELAYSECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRATIONSECONDS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    data: str
    delaySeconds: int
    ExpirationSeconds: int
    def __init__(self, queue: _Optional[str] = ..., data: _Optional[str] = ..., delaySeconds: _Optional[int] = ..., ExpirationSeconds: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("id", "data", "queue")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: str
    queue: str
    def __init__(self, id: _Optional[str] = ..., data: _Optional[str] = ..., queue: _Optional[str] = ...) -> None: ...

class QueueId(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TopicPublishRequest(_message.Message):
    __slots__ = ("topic", "data", "ExpirationSeconds")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXPIRATIONSECONDS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    data: str
    ExpirationSeconds: int
    def __init__(self, topic: _Optional[str] = ..., data: _Optional[str] = ..., ExpirationSeconds: _Optional[int] = ...) -> None: ...

class DelayTopicPublishRequest(_message.Message):
    __slots__ = ("topic", "data", "delaySeconds", "ExpirationSeconds")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DELAYSECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRATIONSECONDS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    data: str
    delaySeconds: int
    ExpirationSeconds: int
    def __init__(self, topic: _Optional[str] = ..., data: _Optional[str] = ..., delaySeconds: _Optional[int] = ..., ExpirationSeconds: _Optional[int] = ...) -> None: ...

class TopicSubscribeRequest(_message.Message):
    __slots__ = ("topic", "queueName")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    QUEUENAME_FIELD_NUMBER: _ClassVar[int]
    topic: str
    queueName: str
    def __init__(self, topic: _Optional[str] = ..., queueName: _Optional[str] = ...) -> None: ...
