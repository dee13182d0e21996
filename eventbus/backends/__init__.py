"""RabbitMQ, PostgreSQL and Redis, and the asyncio seam they are called through."""
