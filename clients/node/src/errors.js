// The one error a failed call throws, with chatgate's rich error details decoded.
//
// chatgate sends a google.rpc.Status in the `grpc-status-details-bin` trailer: an
// ErrorInfo (a stable `reason`) always, RetryInfo when waiting helps, BadRequest field
// violations for invalid input and QuotaFailure when a quota is exhausted. Errors made
// by gRPC itself (a client-side deadline, a refused connection, the server's
// concurrency limit) have no details: `reason` is then "".
import grpc from "@grpc/grpc-js";
import protobuf from "protobufjs";

// The few google.rpc messages we read (a subset of googleapis' status.proto and
// error_details.proto, same field numbers), so no googleapis download is needed.
const RPC_PROTO = `
syntax = "proto3";
package google.rpc;
message Any { string type_url = 1; bytes value = 2; }
message Duration { int64 seconds = 1; int32 nanos = 2; }
message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
message RetryInfo { Duration retry_delay = 1; }
message QuotaFailure {
  message Violation { string subject = 1; string description = 2; string api_service = 3;
                      string quota_metric = 4; string quota_id = 5; }
  repeated Violation violations = 1;
}
message BadRequest {
  message FieldViolation { string field = 1; string description = 2; }
  repeated FieldViolation field_violations = 1;
}
`;
const root = protobuf.parse(RPC_PROTO, { keepCase: false }).root;
const Status = root.lookupType("google.rpc.Status");
const DETAIL_TYPES = {
  "type.googleapis.com/google.rpc.ErrorInfo": root.lookupType("google.rpc.ErrorInfo"),
  "type.googleapis.com/google.rpc.RetryInfo": root.lookupType("google.rpc.RetryInfo"),
  "type.googleapis.com/google.rpc.QuotaFailure": root.lookupType("google.rpc.QuotaFailure"),
  "type.googleapis.com/google.rpc.BadRequest": root.lookupType("google.rpc.BadRequest"),
};
const TO_OBJECT = { longs: Number, defaults: true };

/** The reasons of a RESOURCE_EXHAUSTED from one of chatgate's limits (index.d.ts: LimitReason). */
export const LIMIT_REASONS = Object.freeze([
  "REQUESTS_PER_MINUTE_EXCEEDED",
  "TOKENS_PER_MINUTE_EXCEEDED",
  "TOKENS_PER_DAY_EXCEEDED",
  "SPEND_PER_DAY_EXCEEDED",
  "SPEND_PER_MONTH_EXCEEDED",
  "CONCURRENT_STREAMS_EXCEEDED",
]);

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** A chatgate call failed. */
export class ChatgateError extends Error {
  constructor(code, message, details = {}) {
    const codeName = CODE_NAMES[code] ?? String(code);
    super(`${codeName}: ${message}${details.reason ? ` [${details.reason}]` : ""}`);
    this.name = "ChatgateError";
    /** The gRPC status code (a number; see `grpc.status`). */
    this.code = code;
    /** The status code's name, e.g. "UNAVAILABLE". */
    this.codeName = codeName;
    /** The status message, written for the caller. */
    this.details = message;
    this.reason = details.reason ?? "";
    this.domain = details.domain ?? "";
    this.errorMetadata = details.errorMetadata ?? {};
    /** RetryInfo in milliseconds (the earliest a retry may succeed), or null. */
    this.retryDelayMs = details.retryDelayMs ?? null;
    this.fieldViolations = details.fieldViolations ?? [];
    this.quotaViolations = details.quotaViolations ?? [];
    /** How many events the stream delivered before it failed. */
    this.eventsReceived = details.eventsReceived ?? 0;
    /** Set by collect(): what had arrived before the failure, or null. */
    this.partial = null;
  }

  /** Whether one of chatgate's limits refused the call (reason is a LimitReason). */
  get limitExceeded() {
    return LIMIT_REASONS.includes(this.reason);
  }

  /**
   * Whether the same call should succeed after waiting retryDelayMs: chatgate said when
   * it would fit (RetryInfo) and nothing was delivered yet. False when no wait of an hour
   * or less helps (a monthly budget spent, a block, RESOURCE_EXHAUSTED without RetryInfo).
   */
  get waitingHelps() {
    return this.retryDelayMs !== null && this.retryable;
  }

  /**
   * Whether calling again may succeed without re-billing: only before the first event;
   * UNAVAILABLE unless it is chatgate's own upstream key; RESOURCE_EXHAUSTED only with a
   * RetryInfo (chatgate's limits and resetting quotas send one; without it the limit does
   * not pass by waiting, e.g. gRPC's own message size limit). Wait at least retryDelayMs.
   */
  get retryable() {
    if (this.eventsReceived > 0) return false;
    if (this.code === grpc.status.UNAVAILABLE) {
      return this.reason !== "UPSTREAM_CREDENTIALS" && this.reason !== "UPSTREAM_MISCONFIGURED";
    }
    if (this.code === grpc.status.RESOURCE_EXHAUSTED) {
      return this.retryDelayMs !== null;
    }
    return false;
  }
}

/** The ChatgateError for a grpc-js ServiceError (anything else is returned unchanged). */
export function fromServiceError(error, eventsReceived) {
  if (typeof error?.code !== "number" || !error.metadata) return error;
  const status = decodeStatus(error.metadata.get("grpc-status-details-bin")[0]);
  if (!status || status.code !== error.code) {
    // No details, or details that belong to another status (a proxy rewrote it).
    return new ChatgateError(error.code, error.details ?? "", { eventsReceived });
  }
  const found = {};
  for (const any of status.details) {
    const type = DETAIL_TYPES[any.typeUrl];
    if (type) found[type.name] = type.toObject(type.decode(any.value), TO_OBJECT);
  }
  const delay = found.RetryInfo?.retryDelay;
  return new ChatgateError(error.code, error.details || status.message, {
    reason: found.ErrorInfo?.reason,
    domain: found.ErrorInfo?.domain,
    errorMetadata: found.ErrorInfo?.metadata,
    retryDelayMs: delay ? delay.seconds * 1000 + delay.nanos / 1e6 : null,
    fieldViolations: (found.BadRequest?.fieldViolations ?? []).map(({ field, description }) => ({
      field,
      description,
    })),
    quotaViolations: (found.QuotaFailure?.violations ?? []).map((v) => ({
      subject: v.subject,
      description: v.description,
      quotaId: v.quotaId,
      quotaMetric: v.quotaMetric,
    })),
    eventsReceived,
  });
}

function decodeStatus(bytes) {
  if (!Buffer.isBuffer(bytes)) return null;
  try {
    return Status.toObject(Status.decode(bytes), TO_OBJECT);
  } catch {
    return null; // undecodable details: the code and message still stand
  }
}
