#!/usr/bin/env python3
"""Regenerates proto/ext_authz_v3.binpb, the FileDescriptorSet that gRPC
server reflection serves for envoy.service.auth.v3.Authorization.

envoy-types ships compiled Rust types but no descriptors, and the build has
no protoc; the descriptors compiled into PyPI's `xds-protos` (generated from
envoyproxy/data-plane-api) are the same schema, so they are copied out once
and committed. external_auth.proto and every file it imports, dependencies
first, so a reflection client (grpcurl describe) can resolve every type.

    python3 -m venv /tmp/xds && /tmp/xds/bin/pip install xds-protos
    /tmp/xds/bin/python scripts/ext-authz-descriptor.py proto/ext_authz_v3.binpb
"""
import sys

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import descriptor_pb2


def closure(root):
    files = {}

    def visit(fd):
        if fd.name in files:
            return
        for dep in fd.dependencies:
            visit(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files[fd.name] = proto

    visit(root)
    return list(files.values())


def main(out):
    fds = descriptor_pb2.FileDescriptorSet(file=closure(external_auth_pb2.DESCRIPTOR))
    with open(out, "wb") as f:
        f.write(fds.SerializeToString(deterministic=True))
    print(f"{out}: {len(fds.file)} files")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "proto/ext_authz_v3.binpb")
