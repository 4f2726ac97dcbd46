#!/usr/bin/env python3
"""Type a language model's answer into a Feishu card through the gateway (StreamReply).

The gateway creates the card, replies with it, pushes the newest text as fast as Feishu allows
(fairly among all of the app's streams), and closes streaming mode at the end, also when this
program dies half way. Here the "model" is standard input, one word at a time.

Generate the Python stubs once (grpcio-tools), from the repository's root:

    python3 -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/feishu/reply/v1/gateway.proto proto/google/rpc/status.proto

then:

    echo "the answer, word by word" | PYTHONPATH=gen python3 scripts/examples/stream_reply.py \
        --addr 127.0.0.1:50051 --message-id om_xxx [--chat-id oc_xxx] [--token $TOKEN]

Each event the gateway sends is printed as one JSON line (`started`, then `finished`).
"""

import argparse
import json
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict

from feishu.reply.v1 import gateway_pb2 as pb
from feishu.reply.v1 import gateway_pb2_grpc as rpc


def parts(args, words):
    """The request stream: start, the words as they come, finish."""
    yield pb.StreamReplyRequest(
        start=pb.StreamStart(
            app=args.app,
            message_id=args.message_id,
            chat_id=args.chat_id,
            title=args.title,
        )
    )
    for word in words:
        yield pb.StreamReplyRequest(append=word)
        time.sleep(args.delay_ms / 1000)
    yield pb.StreamReplyRequest(finish=pb.StreamFinish())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--app", default="")
    p.add_argument("--message-id", required=True)
    p.add_argument("--chat-id", default="")
    p.add_argument("--title", default="")
    p.add_argument("--token", default="", help="the caller's bearer token, if callers need one")
    p.add_argument("--delay-ms", type=float, default=50, help="pause between words (a model's pace)")
    args = p.parse_args()

    text = sys.stdin.read()
    # Keep the spaces: the card shows exactly the text sent.
    words = [w + " " for w in text.split(" ")]
    words[-1] = words[-1][:-1]

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with grpc.insecure_channel(args.addr) as channel:
        stub = rpc.ReplyGatewayStub(channel)
        try:
            for event in stub.StreamReply(parts(args, words), metadata=metadata):
                print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
        except grpc.RpcError as e:
            # The gateway's reason is in the status message and its details.
            print(f"StreamReply failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
