// ChatgateClient: one channel, `complete()` as an async iterator of events, `collect()`.
import { readFileSync } from "node:fs";
import grpc from "@grpc/grpc-js";
import { ChatgateError, fromServiceError } from "./errors.js";
import { Collector, toEvent } from "./events.js";
import { chatServiceClient } from "./proto.js";

/** chatgate's own default cap; pick a shorter deadline per use case (docs/CALLING.md). */
export const DEFAULT_TIMEOUT_MS = 60_000;

/**
 * The default service config: spread calls over every address the target resolves to
 * (a Kubernetes headless Service gives one per pod; gRPC's default, pick_first, would
 * pin the client to one replica), and retry UNAVAILABLE. gRPC retries a call only while
 * nothing of its response has arrived — for a stream, before any event — which is the
 * error model's rule (docs/CALLING.md). Each retry picks a replica afresh, so a call a
 * draining or dying replica refused is answered by another; the server's
 * grpc-retry-pushback-ms trailer forbids it for upstream failures (chatgate already
 * retried those) and sets the wait when RetryInfo's is short. CANCELLED too: gRPC's
 * server core cancels the calls it had received but not yet handed to chatgate when a
 * replica stops (grpc/grpc#41785), so such a call never ran; chatgate itself never ends
 * a call with CANCELLED, and a call this client cancels is not retried.
 */
export const DEFAULT_SERVICE_CONFIG = Object.freeze({
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [{ service: "chatgate.v1.ChatService" }, { service: "chatgate.v1.UsageService" }],
      retryPolicy: {
        maxAttempts: 3,
        initialBackoff: "0.1s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE", "CANCELLED"],
      },
    },
  ],
});

export const DEFAULT_CHANNEL_OPTIONS = Object.freeze({
  // Ping every 30 s, drop the connection when a ping goes 10 s unanswered: a dead peer
  // or a NAT that forgot the connection is noticed before the next call hangs on it.
  // chatgate permits pings every 10 s, so this never earns a GOAWAY(too_many_pings).
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
  "grpc.keepalive_permit_without_calls": 1,
  // Reconnect within 10 s after a server restart (gRPC's default backoff grows to 120 s).
  "grpc.max_reconnect_backoff_ms": 10_000,
  "grpc.primary_user_agent": "chatgate-client-node/0.1.0",
  // Replace it with your own JSON; "" drops it (behind a mesh or Envoy that balances
  // and retries itself).
  "grpc.service_config": JSON.stringify(DEFAULT_SERVICE_CONFIG),
  // Room to replay a request on retry (gRPC stops retrying a call whose request outgrew
  // it; chatgate takes requests up to 4 MiB).
  "grpc.per_rpc_retry_buffer_size": 8 << 20,
});

/** The defaults with `extra` over them; a "grpc.service_config" of "" removes it. */
export function mergedChannelOptions(extra = {}) {
  const merged = { ...DEFAULT_CHANNEL_OPTIONS, ...extra };
  if (merged["grpc.service_config"] === "") delete merged["grpc.service_config"];
  return merged;
}

export class ChatgateClient {
  #stub;
  #token;
  #timeoutMs;
  #metadata;

  /**
   * @param address host:port (any gRPC target, e.g. "dns:///chatgate:50051").
   * @param options token (bearer token sent as `authorization`) or tokenFile (a file
   *   holding it, read once), credentials (grpc.credentials.createSsl(...); plaintext
   *   when absent) or caFile / certFile + keyFile (TLS from PEM files; the client
   *   certificate for mTLS), timeoutMs (each call's deadline unless the call gives one;
   *   null for none), metadata (sent with every call), channelOptions (over the
   *   defaults: keepalive, and the service config with round_robin and retries).
   */
  constructor(
    address,
    {
      token,
      tokenFile,
      credentials,
      caFile,
      certFile,
      keyFile,
      timeoutMs = DEFAULT_TIMEOUT_MS,
      metadata = {},
      channelOptions = {},
    } = {},
  ) {
    const Stub = chatServiceClient();
    this.#stub = new Stub(
      address,
      channelCredentials(credentials, { caFile, certFile, keyFile }),
      mergedChannelOptions(channelOptions),
    );
    this.#token = resolveToken(token, tokenFile);
    this.#timeoutMs = checkTimeout(timeoutMs);
    this.#metadata = metadata;
  }

  /**
   * Start a completion; iterate the result with `for await` to get events as they
   * arrive. Breaking out of the loop (or aborting `signal`) cancels the call, and
   * chatgate stops the upstream. A failure throws a ChatgateError after any events
   * that arrived before it.
   */
  async *complete(request, { timeoutMs, metadata = {}, signal } = {}) {
    const timeout = timeoutMs === undefined ? this.#timeoutMs : checkTimeout(timeoutMs);
    const options = timeout === null ? {} : { deadline: new Date(Date.now() + timeout) };
    const call = this.#stub.Complete(request, this.#callMetadata(metadata), options);
    const abort = () => call.cancel();
    signal?.addEventListener("abort", abort, { once: true });
    let received = 0;
    try {
      for await (const message of call) {
        const event = toEvent(message);
        if (event === null) continue; // an event kind newer than this client
        received += 1;
        yield event;
      }
    } catch (error) {
      throw fromServiceError(error, received);
    } finally {
      signal?.removeEventListener("abort", abort);
      // Ending early cancels the call, and grpc-js reports that as an 'error' event after
      // we stopped reading: swallow it here rather than rely on a listener the stream
      // iterator may or may not have left behind (an unhandled 'error' kills the process).
      call.on("error", () => {});
      call.cancel(); // a no-op when the call already ended
    }
  }

  /**
   * Run a completion to its end: { text, refusal, toolCalls, finishReason, outcome,
   * usage, cost, requestId, model, ... }. On failure the ChatgateError's `partial`
   * holds what had arrived (null when nothing had).
   */
  async collect(request, options = {}) {
    const collector = new Collector();
    try {
      for await (const event of this.complete(request, options)) collector.add(event);
    } catch (error) {
      if (error instanceof ChatgateError && collector.events > 0) error.partial = collector.result();
      throw error;
    }
    const completion = collector.result();
    if (!completion.finished) {
      const error = new ChatgateError(grpc.status.UNKNOWN, "the stream ended without its final event", {
        reason: "INCOMPLETE_STREAM",
        eventsReceived: collector.events,
      });
      error.partial = completion;
      throw error;
    }
    return completion;
  }

  /** Close the channel; running calls are cancelled. */
  close() {
    this.#stub.close();
  }

  #callMetadata(extra) {
    const md = new grpc.Metadata();
    if (this.#token) md.set("authorization", `Bearer ${this.#token}`);
    for (const [key, value] of Object.entries({ ...this.#metadata, ...extra })) md.set(key, value);
    return md;
  }
}

function checkTimeout(timeoutMs) {
  if (timeoutMs !== null && !(Number.isFinite(timeoutMs) && timeoutMs > 0)) {
    throw new RangeError(`timeoutMs must be a positive number of milliseconds or null, got ${timeoutMs}`);
  }
  return timeoutMs;
}

function resolveToken(token, tokenFile) {
  if (token !== undefined && tokenFile !== undefined) throw new TypeError("give token or tokenFile, not both");
  if (tokenFile === undefined) return token;
  // A file written by `chatgate callers create > token` ends in a newline.
  const text = readFileSync(tokenFile, "utf8").trim();
  if (!text) throw new TypeError(`${tokenFile} is empty`);
  return text;
}

function channelCredentials(credentials, { caFile, certFile, keyFile }) {
  if (caFile === undefined && certFile === undefined && keyFile === undefined) {
    return credentials ?? grpc.credentials.createInsecure();
  }
  if (credentials !== undefined) throw new TypeError("give credentials or caFile/certFile/keyFile, not both");
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new TypeError("certFile and keyFile go together (a client certificate and its key)");
  }
  const read = (file) => (file === undefined ? null : readFileSync(file));
  return grpc.credentials.createSsl(read(caFile), read(keyFile), read(certFile));
}
