"""EST (RFC 7030 / RFC 8951): pure message codecs, the card-backed TLS transport and the client."""

