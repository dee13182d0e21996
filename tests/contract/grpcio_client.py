"""A grpcio client generated at run time from tests/contract/mq.proto, in its own process (its
mq.proto must not meet the daemon's in one descriptor pool).

Usage: python grpcio_client.py ADDRESS QUEUE COUNT; prints what it received as JSON.
"""

import importlib
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent


def generated_modules(out: str) -> tuple:
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(HERE / "mq.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    return importlib.import_module("mq_pb2"), importlib.import_module("mq_pb2_grpc")


def main(address: str, queue: str, count: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        mq_pb2, mq_pb2_grpc = generated_modules(out)
        with grpc.insecure_channel(address) as channel:
            stub = mq_pb2_grpc.MqStub(channel)
            for i in range(count):
                stub.publish(mq_pb2.PublishRequest(queue=queue, data=f"grpcio {i}"), timeout=10)
            received = []
            for _ in range(count):
                reply = stub.subscribe(mq_pb2.SubscribeRequest(queue=queue), timeout=10)
                stub.ack(mq_pb2.QueueId(id=reply.id), timeout=10)
                received.append({"id": reply.id, "data": reply.data, "queue": reply.queue})
    print(json.dumps({"received": received}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
