"""Dovecot's passdb/userdb templates: `key=value key2` strings with %-expanded values.

Static drivers and default/override fields use them (passdb-template.c,
userdb-template.c): split on spaces, the first '=' separates, a key without '='
has no value, an empty key is an error.
"""

from __future__ import annotations

from authd.auth_request import AuthRequest, resolve_id


class TemplateError(ValueError):
    """The template cannot be used (bad key, unknown uid/gid name)."""


Template = tuple[tuple[bytes, bytes | None], ...]


def parse_template(text: str, *, userdb: bool = False) -> Template:
    """Parse once at start-up; userdb templates resolve uid/gid names right away."""
    items: list[tuple[bytes, bytes | None]] = []
    for token in text.encode().split(b" "):
        if not token:
            continue
        key, sep, value = token.partition(b"=")
        if not key:
            raise TemplateError(f"Invalid template {text} - key must not be empty")
        item_value: bytes | None = value if sep else None
        if userdb and key.lower() in (b"uid", b"gid"):
            number = resolve_id(key.lower(), item_value or b"")
            if number is None:
                raise TemplateError(f"Invalid {key.decode()}: {(item_value or b'').decode()}")
            item_value = number
        items.append((key, item_value))
    return tuple(items)


def remove(template: Template, key: bytes) -> tuple[Template, bytes | None, bool]:
    """Take `key` out of a template: (rest, its value, whether it was there)."""
    rest = tuple(item for item in template if item[0] != key)
    found = [value for name, value in template if name == key]
    return rest, (found[0] if found else None), bool(found)


def export_passdb(template: Template, req: AuthRequest) -> None:
    """passdb_template_export: set each field, values %-expanded (raises VarExpandError)."""
    for key, value in template:
        req.set_field(key, b"" if value is None else req.expand(value), "PLAIN")


def export_userdb(template: Template, req: AuthRequest) -> None:
    """userdb_template_export (raises VarExpandError)."""
    for key, value in template:
        req.set_userdb_field(key, b"" if value is None else req.expand(value))
