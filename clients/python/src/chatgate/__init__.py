"""chatgate client: generated gRPC stubs (``chatgate.v1``) and helpers."""
