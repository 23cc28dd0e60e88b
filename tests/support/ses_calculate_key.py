# AWS's derivation of an SES SMTP password from a secret access key, as its SES developer guide's
# `calculate_key` writes it, in Python's hmac/hashlib: a second implementation rekey's tests compare
# src/secrets/ses.rs with (the unit tests and tests/ses.rs). Reads the secret and the region, one per
# line, on stdin (never on the command line).
import base64, hashlib, hmac, sys
def sign(key, msg):
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()
secret, region = sys.stdin.read().split("\n")[:2]
sig = sign(("AWS4" + secret).encode("utf-8"), "11111111")
for part in (region, "ses", "aws4_request", "SendRawEmail"):
    sig = sign(sig, part)
print(base64.b64encode(bytes([0x04]) + sig).decode("utf-8"))
