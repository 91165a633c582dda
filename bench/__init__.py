"""authd vs Dovecot 2.3.19 benchmark: `python -m bench` (see bench/README.md)."""
