"""The gRPC edge: protobuf ⇄ domain, error → status. Only this package imports grpc."""
