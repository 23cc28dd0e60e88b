"""Create the identities of the test environment in moto.

moto starts with INITIAL_NO_AUTH_ACTION_COUNT=3: exactly the three calls that create the admin
identity below go through unauthenticated; everything after them, including the rest of this
script, is signed and checked against the caller's IAM policies, as on real AWS.

Identities:
- testenv-admin: the test fixtures' identity (creates users, sets consent tags, inspects keys).
- rekey-operator: the identity the operator runs as, with the actions of deploy/iam-policy.json
  (least privilege; see moto_evaluable for what moto can and cannot check of it).
"""

import argparse
import json
import os
import sys

import boto3

ADMIN_USER = "testenv-admin"
OPERATOR_USER = "rekey-operator"

# The actions a full rotation needs; deploy/iam-policy.json (when it exists) takes precedence.
OPERATOR_ACTIONS = [
    "iam:CreateAccessKey",
    "iam:UpdateAccessKey",
    "iam:DeleteAccessKey",
    "iam:ListAccessKeys",
    "iam:GetAccessKeyLastUsed",
    "iam:GetUser",
    "iam:ListUserTags",
    "iam:TagUser",
    "iam:UntagUser",
    "sts:GetCallerIdentity",
    "sts:AssumeRole",
]


def client(endpoint, service, key=None):
    kwargs = dict(endpoint_url=endpoint, region_name="us-east-1")
    if key:
        kwargs.update(aws_access_key_id=key[0], aws_secret_access_key=key[1])
    else:
        # The unauthenticated bootstrap calls still need some credentials to be signed with.
        kwargs.update(aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    return boto3.client(service, **kwargs)


def moto_evaluable(policy):
    """deploy/iam-policy.json as moto can evaluate it: the same actions and effects, with Resource
    "*" (moto matches IAM calls against "*", not the user's ARN) and without Condition blocks (moto
    has no request context for them and would deny every conditioned Allow). A conditioned Deny
    cannot be kept without its condition (it would deny the description tag too), so it is left out:
    the real policy's scoping and its deny on rekey.dev/* tag changes are documented, not tested."""
    statements = []
    for st in policy["Statement"]:
        if st["Effect"] == "Deny" and "Condition" in st:
            continue
        st = {k: v for k, v in st.items() if k != "Condition"}
        st["Resource"] = "*"
        statements.append(st)
    return json.dumps({"Version": policy["Version"], "Statement": statements})


def operator_policy(repo_root):
    path = os.path.join(repo_root, "deploy", "iam-policy.json")
    if os.path.exists(path):
        with open(path) as f:
            return moto_evaluable(json.load(f))
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": OPERATOR_ACTIONS, "Resource": "*"}],
        }
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    # The three unauthenticated calls.
    iam = client(args.endpoint, "iam")
    iam.create_user(UserName=ADMIN_USER)
    iam.put_user_policy(
        UserName=ADMIN_USER,
        PolicyName="admin",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    k = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
    admin = (k["AccessKeyId"], k["SecretAccessKey"])

    # From here on, signed by the admin key.
    iam = client(args.endpoint, "iam", admin)
    sts = client(args.endpoint, "sts", admin)
    ident = sts.get_caller_identity()
    if not ident["Arn"].endswith("user/" + ADMIN_USER):
        sys.exit("admin key does not authenticate as %s: %s" % (ADMIN_USER, ident["Arn"]))
    try:
        client(args.endpoint, "sts", (admin[0], "not-the-secret")).get_caller_identity()
        sys.exit("moto accepted a wrongly signed request: request signing is not enforced")
    except iam.exceptions.ClientError:
        pass

    iam.create_user(UserName=OPERATOR_USER)
    iam.put_user_policy(UserName=OPERATOR_USER, PolicyName="rekey-operator", PolicyDocument=operator_policy(repo_root))
    k = iam.create_access_key(UserName=OPERATOR_USER)["AccessKey"]
    operator = (k["AccessKeyId"], k["SecretAccessKey"])

    with open(args.out, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write("AWS_ACCESS_KEY_ID=%s\n" % operator[0])
        f.write("AWS_SECRET_ACCESS_KEY=%s\n" % operator[1])
        f.write("REKEY_TEST_OPERATOR_USER=%s\n" % OPERATOR_USER)
        f.write("REKEY_TEST_ADMIN_ACCESS_KEY_ID=%s\n" % admin[0])
        f.write("REKEY_TEST_ADMIN_SECRET_ACCESS_KEY=%s\n" % admin[1])
        f.write("REKEY_TEST_ACCOUNT_ID=%s\n" % ident["Account"])
    print("bootstrapped %s and %s in account %s" % (ADMIN_USER, OPERATOR_USER, ident["Account"]))


if __name__ == "__main__":
    main()
