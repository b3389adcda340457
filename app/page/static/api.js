// The app's API as the page uses it (/api/v1, docs/app.md). Every failure comes back as an
// ApiFailure: the HTTP status (0 when no answer came), the error envelope's code and
// message, Retry-After in seconds, and the request id to quote when asking for help.
// A turn is taken streamed (server-sent events, streamTurn) where the browser can, else
// as one JSON answer (takeTurn).

const BASE = "/api/v1";

export class ApiFailure extends Error {
  constructor(status, code, message, { retryAfter = null, requestId = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
  }

  get isNetwork() {
    return this.status === 0;
  }
}

function retryAfterOf(header) {
  if (!header) return null;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const at = Date.parse(header);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

function failureOf(status, text, retryAfterHeader) {
  let error = {};
  try {
    error = JSON.parse(text).error ?? {};
  } catch {
    // Not the envelope (a proxy's page, say): the status says enough.
  }
  return envelopeFailure(status, error, retryAfterHeader);
}

function envelopeFailure(status, error, retryAfterHeader = null) {
  return new ApiFailure(status, error.code ?? `http_${status}`, error.message ?? "", {
    retryAfter: retryAfterOf(retryAfterHeader),
    requestId: error.request_id ?? null,
  });
}

async function call(method, path, { body, timeoutMs = 15000, signal } = {}) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  const stop = () => abort.abort();
  signal?.addEventListener("abort", stop);
  let response;
  try {
    response = await fetch(BASE + path, {
      method,
      body: body === undefined ? undefined : JSON.stringify(body),
      headers: body === undefined ? {} : { "content-type": "application/json" },
      signal: abort.signal,
      cache: "no-store",
    });
  } catch {
    throw new ApiFailure(0, signal?.aborted ? "cancelled" : "network", "");
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", stop);
  }
  const text = await response.text();
  if (!response.ok) throw failureOf(response.status, text, response.headers.get("retry-after"));
  return text ? JSON.parse(text) : null;
}

export const createSession = () => call("POST", "/sessions");
export const getSession = (id) => call("GET", `/sessions/${encodeURIComponent(id)}`);
export const deleteSession = (id) => call("DELETE", `/sessions/${encodeURIComponent(id)}`);
export const health = () => call("GET", "/health", { timeoutMs: 5000 });

/**
 * One turn: `input` is {text} or {audio: Blob}. XMLHttpRequest rather than fetch: it says
 * when the upload is done (`onUploaded`: sending becomes thinking). Aborted by `signal` or
 * after `timeoutMs`.
 */
export function takeTurn(id, input, { timeoutMs, signal, onUploaded }) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", `${BASE}/sessions/${encodeURIComponent(id)}/turns`);
    request.timeout = timeoutMs;
    request.upload.addEventListener("load", () => onUploaded?.());
    request.addEventListener("load", () => {
      if (request.status >= 200 && request.status < 300) {
        resolve(JSON.parse(request.responseText));
      } else {
        reject(failureOf(request.status, request.responseText, request.getResponseHeader("retry-after")));
      }
    });
    request.addEventListener("error", () => reject(new ApiFailure(0, "network", "")));
    request.addEventListener("timeout", () => reject(new ApiFailure(0, "timeout", "")));
    request.addEventListener("abort", () => reject(new ApiFailure(0, "cancelled", "")));
    signal?.addEventListener("abort", () => request.abort());
    if ("text" in input) {
      request.setRequestHeader("content-type", "application/json");
      request.send(JSON.stringify({ text: input.text }));
    } else {
      const form = new FormData();
      form.append("audio", input.audio, `recording.${input.extension}`);
      request.send(form);
    }
  });
}

// The status the JSON turn answers with each code a streamed turn's `error` event can carry,
// so that the page tells both the same way.
const STREAM_ERROR_STATUS = {
  reply_unavailable: 503,
  transcription_unavailable: 503,
  no_speech: 422,
  turn_timeout: 504,
  storage_full: 507,
  internal_error: 500,
};

/** What a streamed turn needs: a readable response body, text decoding, Web Audio. */
export function canStream() {
  const Context = window.AudioContext ?? window.webkitAudioContext;
  return (
    typeof ReadableStream === "function" &&
    typeof Response === "function" &&
    "body" in Response.prototype &&
    typeof TextDecoder === "function" &&
    typeof Context === "function" &&
    typeof Context.prototype.decodeAudioData === "function"
  );
}

/**
 * Server-sent events, parsed as they come: `push` any piece of the text (an event may be
 * split across pieces, a piece may hold several), `onEvent(name, data)` for each whole one.
 */
class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.pending = "";
    this.name = "";
    this.data = [];
  }

  push(text) {
    const all = this.pending + text;
    // A CR at the very end may be half of a CRLF: kept until the next piece says.
    const end = all.endsWith("\r") ? all.length - 1 : all.length;
    const lines = all.slice(0, end).split(/\r\n|\r|\n/);
    this.pending = lines.pop() + all.slice(end);
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.onEvent(this.name || "message", this.data.join("\n"));
      this.name = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment (a keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.name = value;
    else if (field === "data") this.data.push(value);
  }
}

/**
 * One turn, streamed: POSTed with `Accept: text/event-stream`. `on` has a handler per event
 * (transcript, reply, audio), each given the event's JSON; `onAnswered` is called when the
 * answer's head comes (the upload is done). Resolves with the `done` document; rejects with
 * an ApiFailure for a refusal, an `error` event, a broken stream, a timeout or an abort.
 * An answer that is not an event stream (an app that does not stream) is the JSON turn's
 * own and resolves the same way, with `streamed` false.
 */
export async function streamTurn(id, input, { timeoutMs, signal, onAnswered, on }) {
  const abort = new AbortController();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    abort.abort();
  }, timeoutMs);
  const stop = () => abort.abort();
  signal?.addEventListener("abort", stop);
  const lost = () => new ApiFailure(0, timedOut ? "timeout" : signal?.aborted ? "cancelled" : "network", "");
  try {
    let body;
    const headers = { accept: "text/event-stream" };
    if ("text" in input) {
      headers["content-type"] = "application/json";
      body = JSON.stringify({ text: input.text });
    } else {
      body = new FormData();
      body.append("audio", input.audio, `recording.${input.extension}`);
    }
    let response;
    try {
      response = await fetch(`${BASE}/sessions/${encodeURIComponent(id)}/turns`, {
        method: "POST",
        body,
        headers,
        signal: abort.signal,
        cache: "no-store",
      });
    } catch {
      throw lost();
    }
    onAnswered?.();
    const type = response.headers.get("content-type") ?? "";
    if (!response.ok || !type.startsWith("text/event-stream")) {
      let text;
      try {
        text = await response.text();
      } catch {
        throw lost();
      }
      if (!response.ok) throw failureOf(response.status, text, response.headers.get("retry-after"));
      return { result: JSON.parse(text), streamed: false };
    }
    let outcome = null;
    const parser = new EventStreamParser((name, data) => {
      if (outcome) return;
      const event = JSON.parse(data);
      if (name === "done") outcome = { result: event, streamed: true };
      else if (name === "error") {
        const error = event.error ?? {};
        outcome = { failure: envelopeFailure(STREAM_ERROR_STATUS[error.code] ?? 500, error) };
      } else on[name]?.(event);
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    while (!outcome) {
      let piece;
      try {
        piece = await reader.read();
      } catch {
        throw lost();
      }
      if (piece.done) break;
      try {
        parser.push(decoder.decode(piece.value, { stream: true }));
      } catch {
        throw new ApiFailure(502, "bad_stream", ""); // an event that is not the protocol's
      }
    }
    // Nothing follows `done` or `error`; whatever the server still sends is not waited for.
    reader.cancel().catch(() => {});
    if (!outcome) throw new ApiFailure(0, "network", ""); // the stream ended without an outcome
    if (outcome.failure) throw outcome.failure;
    return outcome;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", stop);
  }
}
