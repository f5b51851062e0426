"""The audit trail: events, their hash chain, and the store they are projected into."""
