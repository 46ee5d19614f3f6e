# The app of the HTTP API scenarios: plain `requests`, no credential of its own. It calls
# the API over plain HTTP; requests sends that through HTTP_PROXY (set by the webhook),
# where the agent adds the credential header and calls the API over HTTPS. It prints the
# status and the API's answer as JSON (last line).
import json, os, sys

import requests

try:
    answer = requests.get(os.environ["API_URL"] + os.environ.get("API_PATH", "/"), timeout=20)
    try:
        body = answer.json()
    except ValueError:
        body = answer.text[:300]
    print(json.dumps({"ok": answer.status_code == 200, "status": answer.status_code, "body": body,
                      "proxy": os.environ.get("HTTP_PROXY")}))
    sys.exit(0 if answer.status_code == 200 else 1)
except (requests.RequestException, KeyError) as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)[:500]}))
    sys.exit(1)
