"""Usage and UsageRow moved to proxy.gateway.ledger; this name stays until relay.py imports them from there."""
from proxy.gateway.ledger.records import Usage, UsageRow

__all__ = ["Usage", "UsageRow"]
