"""Local stand-ins for the outside world (SP-API + LWA, Vault, SMTP) and the launcher behind `make run`."""
