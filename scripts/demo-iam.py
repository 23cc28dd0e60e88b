"""IAM side of the demo, as the test administrator (straight to moto).

  demo-iam.py setup USER NAMESPACE CLUSTER   create USER with the consent tag and a first key; print
                                             a Secret manifest holding that key (for kubectl apply -f -)
  demo-iam.py keys USER                      print the user's keys as "ID:Status ..."
"""

import json
import os
import sys

import boto3


def iam():
    return boto3.client(
        "iam",
        endpoint_url=os.environ["REKEY_TEST_MOTO_URL"],
        region_name="us-east-1",
        aws_access_key_id=os.environ["REKEY_TEST_ADMIN_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["REKEY_TEST_ADMIN_SECRET_ACCESS_KEY"],
    )


def main():
    c = iam()
    if sys.argv[1] == "setup":
        user, ns, cluster = sys.argv[2:5]
        c.create_user(UserName=user)
        c.tag_user(UserName=user, Tags=[{"Key": "rekey.dev/allow/" + ns, "Value": cluster}])
        k = c.create_access_key(UserName=user)["AccessKey"]
        print(json.dumps({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "billing-aws", "namespace": ns},
            "stringData": {"AWS_ACCESS_KEY_ID": k["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]},
        }))
    elif sys.argv[1] == "keys":
        keys = c.list_access_keys(UserName=sys.argv[2])["AccessKeyMetadata"]
        print(" ".join("%s:%s" % (k["AccessKeyId"], k["Status"]) for k in sorted(keys, key=lambda k: k["CreateDate"])))


if __name__ == "__main__":
    main()
