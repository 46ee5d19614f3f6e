# The app of the any-cluster -> GCS scenario: google-cloud-storage with the credentials
# google.auth.default() finds, here the GCE metadata server at GCE_METADATA_HOST (set by
# the webhook). The API endpoint is explicit (never STORAGE_EMULATOR_HOST, which drops
# credentials) and so is the project. It reads the seeded object, tries to write one
# and read it back (refused under the example's read-only scope) and prints what happened as JSON (last line).
import json, os, re, sys, uuid

import google.auth
import google.auth.transport.requests
from google.api_core import exceptions
from google.cloud import storage

try:
    credentials, _ = google.auth.default()
    client = storage.Client(
        project=os.environ["GOOGLE_CLOUD_PROJECT"],
        credentials=credentials,
        client_options={"api_endpoint": os.environ["STORAGE_API_ENDPOINT"]},
    )
    bucket = client.bucket(os.environ["BUCKET"])
    read = bucket.blob(os.environ["OBJECT"]).download_as_bytes().decode()
    written = None
    try:
        blob = bucket.blob("uploads/{}.txt".format(uuid.uuid4()))
        blob.upload_from_string("written by an unchanged google-cloud-storage app")
        write = "allowed"
        written = blob.download_as_bytes().decode()
    except exceptions.Forbidden as e:
        # Upload errors carry GCS's JSON error inside the message.
        found = re.search(r'"message":\s*"([^"]+)"', str(e))
        reason = found.group(1) if found else e.message
        write = "refused ({}): {}".format(e.code, reason)
    # What the SDK knows about its identity, from the metadata server.
    from google.auth.compute_engine import _metadata
    info = _metadata.get_service_account_info(google.auth.transport.requests.Request())
    print(json.dumps({
        "ok": True,
        "read": read,
        "write": write,
        "writtenAndReadBack": written,
        "credential": type(credentials).__module__ + "." + type(credentials).__name__,
        "serviceAccount": info.get("email"),
    }))
except (exceptions.GoogleAPIError, google.auth.exceptions.GoogleAuthError, KeyError) as e:
    # What the SDK knows about its identity, from the metadata server.
    from google.auth.compute_engine import _metadata
    info = _metadata.get_service_account_info(google.auth.transport.requests.Request())
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)[:500]}))
    sys.exit(1)
