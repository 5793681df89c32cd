# A stand-in for boto3, so that Debian's nbdkit-S3-plugin runs unmodified in tests with no
# network: boto3.client("s3") returns a client whose objects are files in the directory
# named by $FAKE_S3_DIR (one subdirectory per bucket, '/' in keys escaped as '%2F').
# The same directory can be served by sluice and by nbdkit, which is how they are compared.

import io
import os

from botocore.exceptions import ClientError


def _error(code):
    return ClientError(error_response={"Error": {"Code": code}},
                       operation_name="fake")


class _Client:
    def __init__(self, root):
        self.root = root

    def _path(self, bucket, key):
        d = os.path.join(self.root, bucket)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, key.replace("/", "%2F"))

    def head_object(self, Bucket, Key):
        p = self._path(Bucket, Key)
        if not os.path.exists(p):
            raise _error("NoSuchKey")
        size = os.path.getsize(p)
        return {"ResponseMetadata": {"HTTPHeaders": {"content-length": str(size)}}}

    def get_object(self, Bucket, Key, Range=None):
        p = self._path(Bucket, Key)
        if not os.path.exists(p):
            raise _error("NoSuchKey")
        with open(p, "rb") as f:
            data = f.read()
        if Range:
            a, b = Range[len("bytes="):].split("-")
            data = data[int(a):int(b) + 1]
        return {"Body": io.BytesIO(data),
                "ResponseMetadata": {"HTTPHeaders": {"content-length": str(len(data))}}}

    def put_object(self, Bucket, Key, Body):
        p = self._path(Bucket, Key)
        tmp = p + ".tmp"
        with open(tmp, "wb") as f:
            f.write(bytes(Body))
        os.replace(tmp, p)

    def delete_objects(self, Bucket, Delete):
        for el in Delete["Objects"]:
            try:
                os.unlink(self._path(Bucket, el["Key"]))
            except FileNotFoundError:
                pass
        return {"Errors": []}

    def list_objects_v2(self, Bucket, Prefix="", StartAfter="", ContinuationToken=""):
        d = os.path.join(self.root, Bucket)
        keys = sorted(n.replace("%2F", "/") for n in os.listdir(d)
                      if not n.endswith(".tmp")) if os.path.isdir(d) else []
        contents = [{"Key": k} for k in keys if k.startswith(Prefix) and k > StartAfter]
        return {"IsTruncated": False, "Contents": contents, "NextContinuationToken": ""}


def client(service, **kwargs):
    assert service == "s3"
    return _Client(os.environ["FAKE_S3_DIR"])
