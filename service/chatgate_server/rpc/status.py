"""The one place an error becomes a gRPC status with rich details.

Details travel as a ``google.rpc.Status`` in the trailers (grpcio-status): an
ErrorInfo with a stable reason code always; RetryInfo when waiting helps;
BadRequest field violations for invalid input. Anything that is not a
:class:`ChatgateError` becomes INTERNAL with a generic message (the edge, ``rpc/edge.py``,
logs it once) — never a stack trace or a secret to the caller.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chatgate_server.errors import ChatgateError, InvalidRequest

ERROR_DOMAIN = "chatgate"


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (code, message, rich details) the caller gets for ``error``."""
    if not isinstance(error, ChatgateError):
        error = ChatgateError("internal error")
    code = getattr(code_pb2, error.status_name)
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))]
    if error.retry_after is not None:
        seconds = max(error.retry_after, 0.0)
        whole = math.floor(seconds)
        delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, InvalidRequest):
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    status = rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))
    return status  # type: ignore[no-any-return]


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
