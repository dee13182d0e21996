"""The request path: publishing, consuming, hand-outs, what travels through RabbitMQ."""
