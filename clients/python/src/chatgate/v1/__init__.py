"""Generated code for the chatgate.v1 contract (see protos/). Do not edit."""
