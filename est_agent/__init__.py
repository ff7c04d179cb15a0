"""est-agent: EST (RFC 7030) enrollment with keys that never leave the SIM (GSMA IoT SAFE)."""

__version__ = "0.1.0"
