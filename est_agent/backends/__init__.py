"""Where the keys that sign live, behind one small interface.

`signer` has the `Signer` protocol that CSR building and TLS sign through (a public key and
``sign_digest``), `SoftwareSigner` (a key in memory) and `public_key_from_point`; `iotsafe` has
`CardSigner`, a key inside the SIM's GSMA IoT SAFE applet. csr and est depend on this package,
never on the card package. Nothing is imported here, so that importing the package costs
nothing (cryptography loads with the modules that need it).
"""
