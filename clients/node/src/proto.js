// Loads the chatgate contract at runtime with @grpc/proto-loader: the .proto files
// stay the one source of truth, so there is no generated JavaScript to go stale.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const CHAT_PROTO = "chatgate/v1/chat.proto";

// Inside the chatgate repository the package reads the repository's protos/ (the one
// source of truth); a packed package (npm pack) carries a copy (scripts/copy-protos.mjs).
const CANDIDATE_ROOTS = [
  fileURLToPath(new URL("../../../protos/", import.meta.url)),
  fileURLToPath(new URL("../protos/", import.meta.url)),
];

/** The directory that holds chatgate/v1/chat.proto. */
export function protoRoot() {
  const found = CANDIDATE_ROOTS.find((root) => existsSync(root + CHAT_PROTO));
  if (!found) {
    throw new Error(`chatgate: ${CHAT_PROTO} not found under ${CANDIDATE_ROOTS.join(" or ")}`);
  }
  return found;
}

// How messages look in JavaScript: camelCase fields, enums as their names, int64 as
// Number (token counts and micro-dollars stay far below 2^53), defaults filled in, and
// the name of the set oneof member on `event`.
export const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

let chatService;

/** The generated-at-runtime ChatService client constructor (loaded once). */
export function chatServiceClient() {
  if (!chatService) {
    const definition = protoLoader.loadSync(CHAT_PROTO, { ...LOADER_OPTIONS, includeDirs: [protoRoot()] });
    chatService = grpc.loadPackageDefinition(definition).chatgate.v1.ChatService;
  }
  return chatService;
}
