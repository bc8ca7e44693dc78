"""Compiles one of the project's .proto files at start (grpcio-tools), so the example
clients always match the checkout."""

import atexit
import importlib
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(proto, module):
    """Compiles proto/<proto> into a temporary package; returns (messages, services) of
    `module` (for example "indexer.v1.indexer")."""
    out = tempfile.mkdtemp(prefix="stubs-")
    atexit.register(shutil.rmtree, out, True)
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    status = protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        str(ROOT / "proto" / proto),
    ])
    if status != 0:
        sys.exit(f"protoc failed with status {status}")
    sys.path.insert(0, out)
    return (importlib.import_module(f"{module}_pb2"),
            importlib.import_module(f"{module}_pb2_grpc"))
