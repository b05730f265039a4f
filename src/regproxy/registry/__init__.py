"""What the API layer calls: the Registry protocol and its implementations."""
