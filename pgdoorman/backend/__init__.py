"""The server side: how the pooler connects and logs in to PostgreSQL (TLS today; the relay and the
protocol state machine still live in server.py and protocol/state.py)."""
