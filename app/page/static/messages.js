// What the page says when something goes wrong: each problem its own title and what to do.
// `{seconds}` is filled with the countdown; `{server}` with the app's own message.

export const PROBLEMS = {
  "mic-denied": {
    title: "Microphone access is blocked",
    help:
      "To talk, allow the microphone for this site: select the lock or site-settings icon next to the " +
      "address, set Microphone to Allow, then reload the page. You can type your message meanwhile.",
  },
  "mic-none": {
    title: "No microphone was found",
    help: "Connect a microphone (or switch it on) and try again. You can type your message meanwhile.",
  },
  "mic-busy": {
    title: "The microphone is in use",
    help: "Another app or tab is using it. Close that, then try again, or type your message.",
  },
  "mic-failed": {
    title: "The microphone could not be started",
    help: "Try again; if it keeps failing, check the microphone in your system settings, or type your message.",
  },
  insecure: {
    title: "Voice needs a secure connection",
    help: "Browsers only allow the microphone on https:// pages (or on localhost). Open the https:// address, or type your message.",
  },
  unsupported: {
    title: "This browser cannot record audio",
    help: "Use a current version of Chrome, Edge, Firefox or Safari to talk, or type your message.",
  },
  "rate-limited": {
    title: "Too many messages for now",
    help: "You can send again in {seconds} s.",
    resolved: "You can send again.",
  },
  "reply-unavailable": {
    title: "A reply can't be given right now",
    help: "Your words were kept. Try again in {seconds} s.",
    resolved: "Your words were kept. You can try again now.",
  },
  "transcription-unavailable": {
    title: "Voice can't be understood right now",
    help: "Try again shortly, or type your message instead.",
  },
  "audio-rejected": {
    title: "The recording was not accepted",
    help: "{server}",
  },
  "text-rejected": {
    title: "The message was not accepted",
    help: "{server}",
  },
  network: {
    title: "The companion could not be reached",
    help: "Check your connection, then try again. Nothing was lost on this page.",
  },
  timeout: {
    title: "The reply took too long",
    help: "Nothing was changed. Please try again.",
  },
  busy: {
    title: "The companion is still busy",
    help: "It is finishing an earlier request. Try again in {seconds} s.",
    resolved: "You can try again now.",
  },
  "storage-full": {
    title: "The companion has no room to save right now",
    help: "Nothing you already had is lost, but this was not saved. Try again in {seconds} s.",
    resolved: "You can try again now.",
  },
  "delete-failed": {
    title: "The conversation could not be deleted",
    help: "Nothing was deleted. Please try again in a moment.",
  },
  server: {
    title: "Something went wrong",
    help: "Please try again. If it keeps happening, quote the reference below.",
  },
};

/** The problem an API failure is, from its status and envelope code. */
export function problemOf(failure) {
  if (failure.code === "timeout" || failure.status === 504) return "timeout";
  if (failure.isNetwork) return "network";
  if (failure.status === 429) return "rate-limited";
  if (failure.code === "reply_unavailable") return "reply-unavailable";
  if (failure.code === "transcription_unavailable") return "transcription-unavailable";
  if (failure.code === "session_busy") return "busy";
  if (failure.code === "storage_full") return "storage-full";
  if (failure.code.startsWith("audio_") || failure.code === "no_speech") return "audio-rejected";
  if (failure.status === 400 || failure.status === 413 || failure.status === 415 || failure.status === 422) {
    return "text-rejected";
  }
  return "server";
}
