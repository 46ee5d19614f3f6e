# The app of the AKS -> S3 scenario: plain boto3, configured only by its environment.
# It writes an object, reads it back and prints what happened as JSON (last line).
# No credential is printed.
import json, os, sys, uuid

import boto3
import botocore.exceptions

try:
    session = boto3.session.Session()
    s3 = session.client("s3")
    bucket = os.environ["BUCKET"]
    key = "reports/{}.txt".format(uuid.uuid4())
    body = "written by an unchanged boto3 app at {}".format(os.environ.get("AWS_REGION", "?"))
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode())
    read = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    identity = session.client("sts").get_caller_identity()["Arn"]
    credentials = session.get_credentials()
    print(json.dumps({
        "ok": read == body,
        "bucket": bucket,
        "key": key,
        "read": read,
        "identity": identity,
        "credentialSource": credentials.method,
        "accessKeyPrefix": credentials.access_key[:4],
    }))
except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, KeyError) as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
    sys.exit(1)
