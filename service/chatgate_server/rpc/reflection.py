"""Server reflection, with method symbols resolvable.

grpcio-reflection looks symbols up in protobuf's descriptor pool, whose
``FindFileContainingSymbol`` does not know method names (``pkg.Service.Method``), so
``grpcurl describe chatgate.v1.ChatService.Complete`` fails with "Symbol not found"
(grpc/grpc#34743, open). The pool below answers a method with its service's file.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_reflection.v1alpha import reflection


class _MethodAwarePool:
    """The default descriptor pool, plus method names in FindFileContainingSymbol."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)  # KeyError when not a service
            if method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (and reflection itself)."""
    reflection.enable_server_reflection(
        (*service_names, reflection.SERVICE_NAME), server, pool=_MethodAwarePool(descriptor_pool.Default())
    )
