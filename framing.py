"""Bytes on the wire of a Flower message: the one module that reads Flower's private framing code.

Flower 1.42 exposes no public function for the size of a message on the wire, so this module
imports three private ones (``flwr.common.serde``, ``flwr.supercore.inflatable`` and
``flwr.app.message.message``). ``tests/test_framing.py`` pins the result for known messages,
so a Flower release that changes its framing fails loudly there rather than skewing results.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import PullObjectResponse, PushObjectRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)

__all__ = ["message_bytes", "wire_bytes"]

#: The SuperLink names an upload session by a UUID4 string, which every PushObject request repeats.
_SESSION_ID = "00000000-0000-4000-8000-000000000000"


def message_bytes(message: Message) -> int:
    """Bytes Flower 1.42 moves between SuperLink and SuperNode for ``message`` (either way).

    Flower sends a message in pieces: the message proto without content plus its object
    tree (``PushMessages`` / ``PullMessages``), then every object of the tree, each
    deflated to a header and a body (``PushObject`` / ``PullObject``): the Message, its
    RecordDict, each record, each Array and each distinct ArrayChunk (up to 5 MiB each).
    The count is the serialized size of the message proto (with the ``message_id`` that
    the SuperLink assigns, the object ID of the message) plus the serialized object tree
    plus the length of every distinct object's deflated content. It leaves out HTTP and
    TLS framing and the per-request fields (node, run and session IDs, the 64-character
    object ID of each ``PushObject`` request), and it does not model that the SuperLink
    skips objects it already holds from other messages.

    Parameters
    ----------
    message : Message
        Any message, with content or with an error.

    Returns
    -------
    int
        The size in bytes.
    """
    with no_object_id_recompute():  # hash each object once
        return _message_bytes(message)


def _message_bytes(message: Message) -> int:
    envelope = message_to_proto(remove_content_from_message(message))
    # The SuperLink names a message by its object ID (64 hex digits); the simulation engine
    # uses a shorter UUID and a message not sent yet has none: count what a deployment sends.
    envelope.metadata.message_id = message.object_id
    objects = get_all_nested_objects(message)
    body = sum(len(obj.deflate()) for obj in objects.values())
    return envelope.ByteSize() + get_object_tree(message).ByteSize() + body


def wire_bytes(message: Message) -> int:
    """Bytes of the HTTP bodies that carry ``message`` between SuperNode and SuperLink in Flower 1.42.

    What :func:`message_bytes` counts, plus the request and response fields around it, built
    with Flower's own protos: a node's reply (it has ``reply_to_message_id``) travels up as one
    ``PushMessages`` request (node id, the message proto, its object tree, the ClientApp's
    runtime) and one ``PushObject`` request per object (node, run and session ids, the 64-digit
    object id, the content); a server message travels down as one ``PullMessages`` response and
    one ``PullObject`` response per object (two flags and the content). Left out, as transport
    rather than message: HTTP headers, TLS, the requests of a pull and the responses of a push
    (object ids, flags), and polling that finds nothing.

    Parameters
    ----------
    message : Message
        Any message, with content or with an error.

    Returns
    -------
    int
        The size in bytes.
    """
    with no_object_id_recompute():
        envelope = message_to_proto(remove_content_from_message(message))
        envelope.metadata.message_id = message.object_id
        tree = get_object_tree(message)
        objects = get_all_nested_objects(message)
        if message.metadata.reply_to_message_id:
            node = Node(node_id=message.metadata.src_node_id)
            total = PushMessagesRequest(
                node=node, messages_list=[envelope], message_object_trees=[tree], clientapp_runtime_list=[0.0]
            ).ByteSize()
            return total + sum(
                PushObjectRequest(
                    node=node,
                    run_id=message.metadata.run_id,
                    object_id=object_id,
                    object_content=obj.deflate(),
                    session_id=_SESSION_ID,
                ).ByteSize()
                for object_id, obj in objects.items()
            )
        total = PullMessagesResponse(messages_list=[envelope], message_object_trees=[tree]).ByteSize()
        return total + sum(
            PullObjectResponse(object_found=True, object_available=True, object_content=obj.deflate()).ByteSize()
            for obj in objects.values()
        )
