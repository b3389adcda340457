// The conversation's session id, kept in localStorage so that a reload (or tomorrow's
// visit) continues it. Whoever holds the id can read the conversation: it is kept nowhere
// else, and "Delete conversation" forgets it. Storage may be refused (private modes):
// then the conversation lasts as long as the page.

const KEY = "voice-companion.session";
let inMemory = null;

export function savedSession() {
  try {
    return localStorage.getItem(KEY) ?? inMemory;
  } catch {
    return inMemory;
  }
}

export function saveSession(id) {
  inMemory = id;
  try {
    localStorage.setItem(KEY, id);
  } catch {
    // Kept in memory only.
  }
}

export function forgetSession() {
  inMemory = null;
  try {
    localStorage.removeItem(KEY);
  } catch {
    // Nothing was stored.
  }
}
