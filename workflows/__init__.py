"""The reply-delivery workflow and its retry policies. Deterministic code only."""
