"""Dovecot's auth wire protocols, sans-IO.

Objects here take bytes in, hand events out and turn replies into bytes. Nothing
in this package touches sockets, clocks of the event loop, Lua or the daemon:
the caller owns all I/O and decides policy (passdb lookups, delays, penalties).
"""
