"""A standard gRPC client (Python grpcio, gRPC-core) calls a tentacle, learning its
services by server reflection. Run by tests/grpc_clients.rs:

    python grpc_client.py ADDRESS TENTACLE_CERT CLIENT_CERT CLIENT_KEY TARGET_NAME

TARGET_NAME is set as `grpc.ssl_target_name_override` (the SNI sent and the name
checked); an empty one means no override. Prints one JSON object on success;
exits 3 with {"error": ...} when the call fails.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    address, tentacle_cert, client_cert, client_key, target_name = sys.argv[1:6]
    read = lambda p: open(p, "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(tentacle_cert),
        private_key=read(client_key),
        certificate_chain=read(client_cert),
    )
    options = [("grpc.ssl_target_name_override", target_name)] if target_name else []
    channel = grpc.secure_channel(address, credentials, options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=20)
        reflection = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(reflection.get_services())
        pool = descriptor_pool.DescriptorPool(reflection)

        def call(service, method, request=None):
            m = pool.FindServiceByName(service).FindMethodByName(method)
            req_type = message_factory.GetMessageClass(m.input_type)
            reply_type = message_factory.GetMessageClass(m.output_type)
            stub = channel.unary_unary(
                f"/{service}/{method}",
                request_serializer=req_type.SerializeToString,
                response_deserializer=reply_type.FromString,
            )
            reply = stub(request or req_type(), timeout=20)
            return json_format.MessageToDict(reply, preserving_proto_field_name=True)

        hello = call("octopus.tentacle.v1.Session", "Hello")
        caps = call("octopus.tentacle.v1.Capabilities", "GetCapabilities")
        print(json.dumps({"services": services, "hello": hello, "capabilities": caps}))
    except (grpc.RpcError, grpc.FutureTimeoutError) as e:
        detail = e.details() if isinstance(e, grpc.RpcError) else "channel not ready in 20 s"
        print(json.dumps({"error": str(detail)}))
        sys.exit(3)
    finally:
        channel.close()


if __name__ == "__main__":
    main()
