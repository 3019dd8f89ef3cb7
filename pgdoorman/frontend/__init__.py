"""The client side of the pooler: what a client owns beyond one request (its session settings)."""
