"""The local AWS endpoint: moto's server, with STS's AssumeRoleWithWebIdentity made as strict as
AWS is for IRSA.

moto answers AssumeRoleWithWebIdentity for any token and any role. AWS does not: it checks the
token's signature against the identity provider's keys, its audience and expiry, that the role
exists, and that the role's trust policy admits the token's subject. rolemesh's identity
verification depends on exactly those refusals, so this wrapper adds them before handing the call
to moto:

- the token must be a JWT signed by the local control plane's service-account key
  (ROLEMESH_IRSA_SIGNING_KEY, a PEM public key), unexpired, with audience sts.amazonaws.com;
- the role must exist in moto's IAM;
- one Allow statement of the role's trust policy must name sts:AssumeRoleWithWebIdentity, and
  its StringEquals/StringLike conditions on `<issuer>:sub` (and `<issuer>:aud` if present) must
  match the token.

Refusals come back with AWS's error codes: AccessDenied, InvalidIdentityToken, ExpiredTokenException.

Usage: aws_endpoint.py -H 127.0.0.1 -p PORT  (the same arguments as moto_server)
"""

import base64
import fnmatch
import json
import os
import sys
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from moto.iam.models import iam_backends
from moto.server import main as moto_main
from moto.sts import responses as sts_responses
from moto.sts.exceptions import STSClientError

AUDIENCE = "sts.amazonaws.com"


# STS's own error class, so moto serialises refusals as STS errors.
IrsaError = STSClientError


def _b64(segment):
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _verified_claims(token):
    key_path = os.environ.get("ROLEMESH_IRSA_SIGNING_KEY")
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_b64(header_b64))
        claims = json.loads(_b64(payload_b64))
        signature = _b64(signature_b64)
    except Exception:
        raise IrsaError("InvalidIdentityToken", "The web identity token is not a valid JWT")
    if key_path:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_public_key(f.read())
        if header.get("alg") != "ES256" or not isinstance(key, ec.EllipticCurvePublicKey):
            raise IrsaError("InvalidIdentityToken", "Unsupported token signing algorithm")
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        try:
            key.verify(
                utils.encode_dss_signature(r, s),
                f"{header_b64}.{payload_b64}".encode(),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            raise IrsaError(
                "InvalidIdentityToken", "The web identity token's signature is not valid"
            )
    audiences = claims.get("aud")
    audiences = audiences if isinstance(audiences, list) else [audiences]
    if AUDIENCE not in audiences:
        raise IrsaError("InvalidIdentityToken", "Incorrect token audience")
    if claims.get("exp", 0) < time.time():
        raise IrsaError("ExpiredTokenException", "Token is expired")
    return claims


def _condition_matches(condition, claims):
    """Every StringEquals/StringLike key on :sub or :aud must match the token."""
    checked = False
    for operator, entries in (condition or {}).items():
        for key, wanted in entries.items():
            claim = key.rsplit(":", 1)[-1]
            if claim not in ("sub", "aud"):
                continue
            checked = True
            wanted = wanted if isinstance(wanted, list) else [wanted]
            actual = claims.get(claim)
            actual = actual if isinstance(actual, list) else [actual]
            if operator == "StringEquals":
                ok = any(a in wanted for a in actual)
            elif operator == "StringLike":
                ok = any(fnmatch.fnmatchcase(str(a), w) for a in actual for w in wanted)
            else:
                ok = False
            if not ok:
                return False
    return checked


def _role_trusts(role_arn, claims):
    account = role_arn.split(":")[4]
    backend = iam_backends[account]["global"]
    try:
        role = backend.get_role_by_arn(role_arn)
    except Exception:
        return False
    policy = role.assume_role_policy_document
    if isinstance(policy, str):
        policy = json.loads(policy)
    statements = policy.get("Statement", [])
    statements = statements if isinstance(statements, list) else [statements]
    for statement in statements:
        actions = statement.get("Action", [])
        actions = actions if isinstance(actions, list) else [actions]
        if statement.get("Effect") != "Allow":
            continue
        if "sts:AssumeRoleWithWebIdentity" not in actions and "sts:*" not in actions:
            continue
        if _condition_matches(statement.get("Condition"), claims):
            return True
    return False


_moto_assume = sts_responses.TokenResponse.assume_role_with_web_identity


def _strict_assume_role_with_web_identity(self):
    token = self._get_param("WebIdentityToken") or ""
    role_arn = self._get_param("RoleArn") or ""
    claims = _verified_claims(token)
    if not _role_trusts(role_arn, claims):
        raise IrsaError(
            "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
        )
    return _moto_assume(self)


sts_responses.TokenResponse.assume_role_with_web_identity = _strict_assume_role_with_web_identity

if __name__ == "__main__":
    sys.exit(moto_main(sys.argv[1:]))
