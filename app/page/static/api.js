// The app's API as the page uses it (/api/v1, docs/app.md). Every failure comes back as an
// ApiFailure: the HTTP status (0 when no answer came), the error envelope's code and
// message, Retry-After in seconds, and the request id to quote when asking for help.

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
