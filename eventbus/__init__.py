"""eventbus: a message bus daemon for microservices (gRPC in front; RabbitMQ, PostgreSQL, Redis)."""

__version__ = "0.1.0"
