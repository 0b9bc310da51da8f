// @chatgate/client: a thin Node client for chatgate (see README.md and index.d.ts).
export { ChatgateClient, DEFAULT_CHANNEL_OPTIONS, DEFAULT_TIMEOUT_MS } from "./client.js";
export { ChatgateError, LIMIT_REASONS } from "./errors.js";
export { assistant, developer, functionTool, system, toolResult, toStruct, user } from "./messages.js";
export { protoRoot } from "./proto.js";
