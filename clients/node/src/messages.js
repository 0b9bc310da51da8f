// Helpers that build request pieces in the shape @grpc/proto-loader expects.

/** A system message. */
export const system = (text) => ({ role: "ROLE_SYSTEM", text });
/** A developer message (newer models prefer it to system). */
export const developer = (text) => ({ role: "ROLE_DEVELOPER", text });
/** A user message. */
export const user = (text) => ({ role: "ROLE_USER", text });
/** An earlier assistant turn; pass `completion.toolCalls` to continue a tool loop. */
export const assistant = (text = "", toolCalls = []) => ({
  role: "ROLE_ASSISTANT",
  text,
  toolCalls: toolCalls.map(({ id, name, arguments: args }) => ({ id, name, arguments: args })),
});
/** The result of tool call `toolCallId`. */
export const toolResult = (toolCallId, text) => ({ role: "ROLE_TOOL", toolCallId, text });

/** A function the model may call; `parameters` is a plain JSON Schema object. */
export const functionTool = (name, description, parameters, strict) => ({
  name,
  description,
  parameters: toStruct(parameters),
  ...(strict === undefined ? {} : { strict }),
});

/** A plain JSON object as a google.protobuf.Struct (what tool and schema fields take). */
export function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}

function toValue(value) {
  if (value === null || value === undefined) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case "number":
      return { numberValue: value };
    case "string":
      return { stringValue: value };
    case "boolean":
      return { boolValue: value };
    case "object":
      return { structValue: toStruct(value) };
    default:
      throw new TypeError(`cannot put a ${typeof value} in a google.protobuf.Struct`);
  }
}
