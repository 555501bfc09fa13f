"""sinch-gateway: Kafka in, Sinch Conversation API out, at Sinch's limits."""

__version__ = "0.1.0"
