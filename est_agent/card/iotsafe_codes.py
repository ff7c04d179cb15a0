"""GSMA IoT SAFE (IoT.05) code points: instructions, data tags, parameter and value tables.

One table for both sides of the same bytes: the client (``est_agent.card.iotsafe``) builds
commands with it and parses answers, the virtual SIM (``est_agent.sim``) parses those commands
and builds the answers. The values are those of docs/iot-safe-card.md §2-§4 (the tests replay
its worked exchange as raw hex, so a wrong value here cannot pass unnoticed on both sides).
"""

from __future__ import annotations

#: the GSMA IoT SAFE applet AID, under GSMA's RID A000000559 (docs/iot-safe-card.md §1)
DEFAULT_AID = bytes.fromhex("A0000005590010")

# -- instructions (docs/iot-safe-card.md §3) ------------------------------------------------
INS_GET_DATA = 0xCB
INS_GENERATE_KEY_PAIR = 0xB9
INS_READ_PUBLIC_KEY = 0xCD
INS_GET_RANDOM = 0x84
INS_SIGN_INIT = 0x2A
INS_SIGN_UPDATE = 0x2B
INS_VERIFY_INIT = 0x2C
INS_VERIFY_UPDATE = 0x2D
INS_READ_FILE = 0xB0
INS_PUT_PUBLIC_KEY_INIT = 0x24
INS_PUT_PUBLIC_KEY_UPDATE = 0xD8
INS_COMPUTE_DH = 0x46
INS_COMPUTE_PRF = 0x48
INS_COMPUTE_HKDF = 0x4A

# -- P1 of the session commands: INIT opens or closes, UPDATE marks the last block -----------
P1_OPEN = 0x00
P1_CLOSE = 0x01
P1_LAST_BLOCK = 0x80
P1_MORE_BLOCKS = 0x00

# -- GET DATA P1: applet information, object list, one object's info container --------------
GET_DATA_APP_INFO = 0x00
GET_DATA_OBJECT_LIST = 0x01
CONTAINER_PRIVATE_KEY = 0xC1
CONTAINER_PUBLIC_KEY = 0xC2
CONTAINER_FILE = 0xC3
CONTAINER_SECRET_KEY = 0xC4

# -- data tags (docs/iot-safe-card.md §2, §3) -----------------------------------------------
TAG_FILE_ID = 0x83
TAG_PRIVATE_KEY_ID = 0x84
TAG_PUBLIC_KEY_ID = 0x85
TAG_SECRET_KEY_ID = 0x86
TAG_FILE_LABEL = 0x73
TAG_PRIVATE_KEY_LABEL = 0x74
TAG_PUBLIC_KEY_LABEL = 0x75
TAG_SECRET_KEY_LABEL = 0x76
#: info container -> (ID tag, label tag) of the objects it describes
REF_TAGS = {
    CONTAINER_PRIVATE_KEY: (TAG_PRIVATE_KEY_ID, TAG_PRIVATE_KEY_LABEL),
    CONTAINER_PUBLIC_KEY: (TAG_PUBLIC_KEY_ID, TAG_PUBLIC_KEY_LABEL),
    CONTAINER_FILE: (TAG_FILE_ID, TAG_FILE_LABEL),
    CONTAINER_SECRET_KEY: (TAG_SECRET_KEY_ID, TAG_SECRET_KEY_LABEL),
}
TAG_PUBLIC_KEY = 0x34
TAG_ECC_KEY = 0x49
TAG_EC_POINT = 0x86  # inside TAG_ECC_KEY; the same byte as TAG_SECRET_KEY_ID elsewhere
TAG_SIGNATURE = 0x33
TAG_MODE = 0xA1
TAG_HASH_ALGS = 0x91
TAG_SIG_ALGS = 0x92
TAG_HASH_VALUE = 0x9E
# COMPUTE/VERIFY SIGNATURE UPDATE data by mode (GSMA IoT.05 §3.5): 9B the message (mode 01),
# 9A last block + 9C intermediate hash + 9D bytes hashed so far (mode 02)
TAG_MESSAGE = 0x9B
TAG_LAST_BLOCK = 0x9A
TAG_INTERMEDIATE_HASH = 0x9C
TAG_HASHED_LENGTH = 0x9D
# COMPUTE PRF / COMPUTE HKDF data (Thales' middleware, wolfSSL's IoT-SAFE port; Orange's
# library defines D5): D1 a secret given in the command, D2 label||seed (PRF), D3 the output
# length, D4 an ECDHE premaster (PRF mode 02, not offered here), D5 the salt (HKDF)
TAG_SECRET_VALUE = 0xD1
TAG_LABEL_SEED = 0xD2
TAG_OUTPUT_LENGTH = 0xD3
TAG_PREMASTER = 0xD4
TAG_SALT = 0xD5
#: HKDF info (the expand step): no public client sends an expand, so this tag is ours
TAG_INFO = 0xD6

# -- GET DATA applet information (docs/iot-safe-card.md §4) ---------------------------------
TAG_APPLET_VERSION = 0x10
TAG_APPLET_ID = 0x11
TAG_MAX_FILES = 0xB1
TAG_MAX_PRIVATE_KEYS = 0xB2
TAG_MAX_PUBLIC_KEYS = 0xB3
TAG_MAX_SECRET_KEYS = 0xB4
TAG_CRYPTO_FUNCTIONS = 0x90
TAG_KEY_AGREEMENT_ALGS = 0x93
TAG_KEY_DERIVATION_ALGS = 0x94
TAG_MAX_SESSIONS = 0xB7  # TAG_HASH_ALGS and TAG_SIG_ALGS are shared with the commands

# -- inside an object's info container (docs/iot-safe-card.md §4) ---------------------------
TAG_ACCESS = 0x60
TAG_STATE = 0x4A
TAG_KEY_TYPE = 0x4B
TAG_KEY_USAGE = 0x4E
TAG_OBJECT_FUNCTIONS = 0x61
TAG_OBJECT_KEY_AGREEMENT = 0x6F
TAG_OBJECT_KEY_DERIVATION = 0x94  # in a C4 container: the same byte as the applet's 94
TAG_FILE_USAGE = 0x21
TAG_FILE_SIZE = 0x20  # 2 bytes, big-endian

# -- COMPUTE SIGNATURE modes: what the host hashed ------------------------------------------
MODE_FULL_TEXT = 0x01
MODE_LAST_BLOCK = 0x02
MODE_PAD_AND_SIGN = 0x03  # the host supplies the final hash: what every source uses

# -- value tables (docs/iot-safe-card.md §4) ------------------------------------------------
ACCESS_READ = 0x01
ACCESS_UPDATE = 0x02
KEY_TYPE_P256 = 0x13
KEY_TYPE_HMAC = 0xA0  # a secret key: HMAC-capable (PSK)
KEY_USAGE_GENERAL = 0x01
CRYPTO_SIGNATURE = 0x01
CRYPTO_KEY_GENERATION = 0x02
CRYPTO_KEY_AGREEMENT = 0x04
CRYPTO_KEY_DERIVATION = 0x08
KEY_AGREEMENT_ECKA = 0x01  # ECKA-DH (SEC 1 §3.3.1; NIST SP 800-56A §5.7.1.2): the x-coordinate
DERIVATION_TLS12_PRF = 0x01  # TLS 1.2 PRF with SHA-256 (RFC 5246 §5)
DERIVATION_HKDF = 0x02  # HKDF (RFC 5869)
HASH_SHA256 = 0x0001  # 2 bytes on the wire: 00 01
HASH_SHA384 = 0x0002
HASH_SHA512 = 0x0004
#: hash algorithm bit (tag 91) -> (hashlib name, digest bytes)
HASHES: dict[int, tuple[str, int]] = {
    HASH_SHA256: ("sha256", 32),
    HASH_SHA384: ("sha384", 48),
    HASH_SHA512: ("sha512", 64),
}
SIGNATURE_ECDSA = 0x04
FILE_USAGE_GENERAL = 0x01
FILE_USAGE_X509 = 0x02

# -- object references: Orange's library caps IDs and labels (docs/iot-safe-card.md §2) -----
MAX_ID_BYTES = 20
MAX_LABEL_BYTES = 60

# -- applet status words beyond ISO/IEC 7816-4 (docs/iot-safe-card.md §9) -------------------
SW_MORE_DATA = 0x6300
SW_SIGNATURE_MISMATCH = 0x6D01
