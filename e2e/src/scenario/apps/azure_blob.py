# The app of the EKS -> Azure Blob scenario: azure-identity and azure-storage-blob,
# configured only by the environment. ManagedIdentityCredential finds IDENTITY_ENDPOINT
# and IDENTITY_HEADER (set by the webhook). It writes a blob, reads it back and prints
# what happened as JSON (last line). No token is printed.
import json, os, sys, uuid

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.identity import ManagedIdentityCredential
from azure.storage.blob import BlobServiceClient

try:
    credential = ManagedIdentityCredential()
    service = BlobServiceClient(account_url=os.environ["AZURE_STORAGE_ACCOUNT_URL"], credential=credential)
    container = service.get_container_client(os.environ.get("CONTAINER", "reports"))
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    name = "report-{}.txt".format(uuid.uuid4())
    body = "uploaded by an unchanged azure-storage-blob app"
    blob = container.get_blob_client(name)
    blob.upload_blob(body.encode())
    read = blob.download_blob().readall().decode()
    token = credential.get_token("https://storage.azure.com/.default")
    print(json.dumps({
        "ok": read == body,
        "container": container.container_name,
        "blob": name,
        "read": read,
        "credential": type(credential._credential).__name__ if hasattr(credential, "_credential") else "ManagedIdentityCredential",
        "tokenExpiresOn": token.expires_on,
    }))
except (AzureError, KeyError) as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)[:500]}))
    sys.exit(1)
