"""`python tests/gcs_emulator.py start --host 127.0.0.1 --port P --in-memory --default-bucket B`: the
pure-Python gcp-storage-emulator with two behaviours of real GCS that tensorstore (Orbax's array
writer) relies on and the emulator lacks: media downloads carry `x-goog-generation`, and
`ifGenerationMatch` / `ifGenerationNotMatch` are honoured (412 / 304). Without them tensorstore's
revalidating read of an OCDBT manifest fails with "Malformed StorageGeneration". Uploads honour
`ifGenerationMatch=0` (create only if absent, atomically: 412 when the object exists), which gcsfs sends
for `mode="create"`."""
import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return _download(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    not_match = request.query.get("ifGenerationNotMatch")
    match = request.query.get("ifGenerationMatch")
    if not_match and not_match[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
    elif match and match[0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
    else:
        _download(request, response, storage, *args, **kwargs)
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download   # objects.get (GET .../o/NAME?alt=media) calls it by its module name

_insert = objects.insert
_insert_lock = threading.Lock()   # (the server is threaded: the existence check and the write are one step)


def insert(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch", [None])[0] != "0":
        return _insert(request, response, storage, *args, **kwargs)
    name = request.query.get("name", [None])[0]
    if name is None and isinstance(request.data, dict):
        name = (request.data.get("meta") or request.data).get("name")
    with _insert_lock:
        try:
            storage.get_file_obj(request.params["bucket_name"], name)
        except NotFound:
            return _insert(request, response, storage, *args, **kwargs)
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did "
                                                         "not hold."}})


objects.insert = insert
for _, methods in server.HANDLERS:   # (the routing table holds the function objects themselves)
    for method, handler in list(methods.items()):
        if handler is _insert:
            methods[method] = insert

if __name__ == "__main__":
    sys.exit(emulator_main.main(sys.argv[1:]))
