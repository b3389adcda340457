// The voice page: states, controls and the conversation (docs/page.md).
//
// States: idle, recording, sending, thinking, speaking, error, offline - announced in the
// status region. One turn at a time: while one is under way, talking and sending wait -
// but for a streamed turn whose reply is already being spoken: talking (or sending) then
// interrupts it (barge-in), and its stream is abandoned (the app completes the turn).

import * as api from "/assets/api.js";
import { PROBLEMS, problemOf } from "/assets/messages.js";
import { canSpeak, ChunkPlayer, Player } from "/assets/player.js";
import { MicrophoneError, microphonePermission, Recorder, recordingUnavailable } from "/assets/recorder.js";
import { forgetSession, savedSession, saveSession } from "/assets/session.js";

const body = document.body.dataset;
const MAX_RECORDING_MS = Number(body.maxAudioSeconds) * 1000;
// A little after the app's own turn timeout, so that its 504 ("nothing was changed") comes first.
const TURN_ABORT_MS = Number(body.turnTimeoutS) * 1000 + 5000;
const MIN_RECORDING_MS = 300;
const STILL_WORKING_S = 10;
const LONGER_THAN_USUAL_S = 30;
const PROBE_EVERY_MS = 3000;
const TOGGLE_KEY = "voice-companion.toggle-mode";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  log: $("conversation"),
  emptyHint: $("empty-hint"),
  banner: $("offline-banner"),
  error: $("error"),
  errorTitle: $("error-title"),
  errorHelp: $("error-help"),
  errorReference: $("error-reference"),
  errorRetry: $("error-retry"),
  errorDismiss: $("error-dismiss"),
  waiting: $("waiting"),
  elapsed: $("elapsed"),
  waitingNote: $("waiting-note"),
  cancel: $("cancel"),
  talk: $("talk-button"),
  talkHelp: $("talk-help"),
  meter: $("meter-level"),
  countdown: $("countdown"),
  toggle: $("toggle-mode"),
  form: $("message-form"),
  message: $("message"),
  send: $("send"),
  newConversation: $("new-conversation"),
  deleteConversation: $("delete-conversation"),
  confirmDelete: $("confirm-delete"),
};

const STATE_TEXT = {
  idle: "Ready",
  recording: "Recording",
  sending: "Sending",
  thinking: "Thinking",
  speaking: "Speaking",
  error: "Something went wrong",
  offline: "Offline",
};

const page = {
  state: "idle",
  offline: !navigator.onLine,
  busy: false, // a turn (or a deletion) under way
  starting: false, // the microphone is being opened
  stopRequested: false, // let go before the microphone was open
  sessionId: savedSession(),
  turn: null, // the turn under way: {abort, audio (chunks came), reply (its streaming bubble), interrupted}
  blockedUntil: 0, // a 429's Retry-After
  retry: null, // what "Try again" sends again
  errorTimer: null,
  countdownTimer: null,
  waitingTimer: null,
  probeTimer: null,
  talkNote: "", // why talking may not work here, told before the first press
};

const playback = {
  onPlaying: () => setState("speaking"),
  onStopped: () => {
    if (page.state === "speaking") setState("idle");
  },
};
const player = new Player(playback);
// Streamed turns where the browser has what they need; the JSON turn elsewhere.
const streaming = api.canStream();
const chunks = new ChunkPlayer(playback);

function unlockPlayback() {
  player.unlock();
  if (streaming) chunks.unlock();
}

function stopPlayback() {
  player.stop();
  chunks.stop();
}

/** A streamed reply is being spoken: talking or sending now interrupts it. */
function interruptible() {
  return Boolean(page.turn?.audio) && chunks.playing;
}

/** Barge-in: the streamed turn's playback stops at once and its stream is abandoned. */
function interrupt() {
  const turn = page.turn;
  if (turn && interruptible()) {
    turn.interrupted = true;
    page.turn = null;
    page.busy = false;
    stopWaiting();
    turn.abort.abort();
  }
  stopPlayback();
}

const recorder = new Recorder({ onLevel: (level) => (ui.meter.style.width = `${Math.round(level * 100)}%`) });

// -- states and controls -----------------------------------------------------------------

function setState(state, text = STATE_TEXT[state]) {
  page.state = state;
  document.body.dataset.state = state;
  if (ui.status.textContent !== text) ui.status.textContent = text;
  updateControls();
}

function toggleMode() {
  return ui.toggle.checked;
}

function updateControls() {
  const recording = recorder.recording || page.starting;
  const cooling = Date.now() < page.blockedUntil;
  const unavailable = page.offline || (page.busy && !interruptible()) || cooling;
  ui.talk.disabled = unavailable && !recording;
  ui.send.disabled = unavailable || recording;
  ui.deleteConversation.disabled = page.busy || !page.sessionId;
  ui.newConversation.disabled = page.busy || (!page.sessionId && ui.log.children.length === 0);
  ui.talk.classList.toggle("recording", recording);
  ui.talk.textContent = toggleMode()
    ? recording
      ? "Press to send"
      : "Press to talk"
    : recording
      ? "Release to send"
      : "Hold to talk";
  ui.talkHelp.textContent =
    page.talkNote ||
    (toggleMode()
      ? "Press the button or the Space bar once to start, and again to send."
      : "Hold the button or the Space bar while you speak; let go to send.");
  ui.emptyHint.hidden = ui.log.children.length > 0;
}

// -- errors --------------------------------------------------------------------------------

function showError(kind, { seconds = null, server = "", requestId = null, retry = null } = {}) {
  const problem = PROBLEMS[kind];
  clearInterval(page.errorTimer);
  ui.error.dataset.kind = kind;
  ui.errorTitle.textContent = problem.title;
  ui.errorReference.hidden = !requestId;
  ui.errorReference.textContent = requestId ? `Reference: ${requestId}` : "";
  page.retry = retry;
  ui.errorRetry.hidden = !retry;
  const fill = (left) => {
    ui.errorHelp.textContent = (left > 0 || !problem.resolved ? problem.help : problem.resolved)
      .replace("{seconds}", String(left))
      .replace("{server}", server || "Please try again.");
    ui.errorRetry.disabled = left > 0;
  };
  if (seconds) {
    const until = Date.now() + seconds * 1000;
    if (kind === "rate-limited") page.blockedUntil = until;
    fill(seconds);
    page.errorTimer = setInterval(() => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      fill(left);
      if (left === 0) {
        clearInterval(page.errorTimer);
        updateControls();
      }
    }, 250);
  } else {
    fill(0);
  }
  ui.error.hidden = false;
  setState("error", problem.title);
}

function clearError() {
  clearInterval(page.errorTimer);
  ui.error.hidden = true;
  page.retry = null;
  if (page.state === "error") setState(page.offline ? "offline" : "idle");
}

ui.errorDismiss.addEventListener("click", () => {
  clearError();
  ui.talk.focus();
});
ui.errorRetry.addEventListener("click", () => {
  const retry = page.retry;
  clearError();
  retry?.();
});

// -- the conversation ----------------------------------------------------------------------

function addMessage(role, text, options = {}) {
  const item = messageItem(role, text, options);
  ui.log.append(item);
  updateControls();
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function messageItem(role, text, { audioUrl = null, degraded = [], note = "", playable = true } = {}) {
  const item = document.createElement("div");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Companion";
  const words = document.createElement("span");
  words.className = "text";
  words.textContent = text;
  const remark = document.createElement("span");
  remark.className = "note";
  item.append(who, words, remark);
  setNote(item, note);
  if (role === "companion" && playable) addPlayback(item, text, audioUrl, degraded);
  return item;
}

// A reply as it streams: its text grows as the deltas come. Hidden from assistive technology
// until it is whole (the log would announce every delta): then it is replaced by the reply's
// message, which the log announces once.
function streamingReply() {
  const item = messageItem("companion", "", { playable: false });
  item.setAttribute("aria-hidden", "true");
  item.classList.add("streaming");
  ui.log.append(item);
  updateControls();
  return item;
}

function replaceReply(streamed, text, options) {
  const item = messageItem("companion", text, options);
  streamed.replaceWith(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function setNote(item, note) {
  const remark = item.querySelector(".note");
  remark.textContent = note;
  remark.hidden = !note;
}

function addPlayback(item, text, audioUrl, degraded) {
  if (!audioUrl && degraded.includes("speech")) setNote(item, "Spoken reply unavailable");
  if (!audioUrl && !canSpeak()) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "play";
  // Without audio from the app, the browser's own voice reads the reply.
  button.textContent = audioUrl ? "Replay" : "Play reply";
  button.addEventListener("click", async () => {
    chunks.stop();
    if (!audioUrl) {
      player.speak(text);
      return;
    }
    if (await player.play(audioUrl)) {
      button.textContent = "Replay";
      button.classList.remove("needed");
    } else {
      setState("idle", "The reply could not be played.");
    }
  });
  item.append(button);
}

function clearConversation() {
  ui.log.replaceChildren();
  updateControls();
}

async function restoreConversation() {
  if (!page.sessionId) return;
  setState("idle", "Loading the conversation");
  try {
    const session = await api.getSession(page.sessionId);
    for (const message of session.messages) {
      addMessage(message.role === "user" ? "user" : "companion", message.text, { audioUrl: message.audio_url });
    }
    setState("idle", session.messages.length ? "Conversation restored" : "Ready");
  } catch (failure) {
    if (failure.status === 404) {
      // Expired or deleted: a new conversation starts with the next turn.
      forgetSession();
      page.sessionId = null;
      setState("idle");
    } else if (failure.isNetwork) {
      wentOffline(restoreConversation);
    } else {
      showError("server", { requestId: failure.requestId, retry: restoreConversation });
    }
  }
}

async function session() {
  if (!page.sessionId) {
    const created = await api.createSession();
    page.sessionId = created.session_id;
    saveSession(page.sessionId);
  }
  return page.sessionId;
}

// -- a turn --------------------------------------------------------------------------------

async function takeTurn(input, item) {
  if (page.busy) return;
  page.busy = true;
  clearError();
  const turn = { abort: new AbortController(), audio: false, reply: null, interrupted: false };
  page.turn = turn;
  setState("sending");
  startWaiting();
  const thinking = () => page.state === "sending" && setState("thinking");
  const options = { timeoutMs: TURN_ABORT_MS, signal: turn.abort.signal };
  const attempt = async () => {
    const id = await session();
    if (!streaming) {
      return { result: await api.takeTurn(id, input, { ...options, onUploaded: thinking }), streamed: false };
    }
    return api.streamTurn(id, input, { ...options, onAnswered: thinking, on: streamed(turn, item) });
  };
  try {
    let answer;
    try {
      answer = await attempt();
    } catch (failure) {
      if (failure.status !== 404) throw failure;
      // The conversation expired (or was deleted elsewhere): this turn starts a new one.
      forgetSession();
      page.sessionId = null;
      const kept = item;
      clearConversation();
      ui.log.append(kept);
      setState("thinking", "The earlier conversation had ended; starting a new one");
      answer = await attempt();
    }
    await answered(turn, item, answer);
  } catch (failure) {
    if (turn.interrupted) {
      // What was said of the reply stays; the app keeps it whole (shown on a reload).
      const said = turn.reply?.querySelector(".text").textContent;
      if (said) replaceReply(turn.reply, said, { note: "Interrupted", playable: false });
      else turn.reply?.remove();
      return;
    }
    stopWaiting();
    if (turn.audio) chunks.stop();
    turn.reply?.remove();
    page.busy = false;
    turnFailed(failure, input, item);
  } finally {
    if (page.turn === turn) {
      page.busy = false;
      page.turn = null;
    }
    updateControls();
  }
}

// The streamed turn's events before its end: the transcript, the reply as it grows, its audio.
function streamed(turn, item) {
  return {
    transcript: ({ text }) => {
      item.querySelector(".text").textContent = text;
    },
    reply: ({ delta }) => {
      if (!turn.reply) {
        stopWaiting();
        turn.reply = streamingReply();
      }
      turn.reply.querySelector(".text").append(delta);
      turn.reply.scrollIntoView({ block: "nearest" });
    },
    audio: ({ seq, data }) => {
      if (!turn.audio) {
        turn.audio = true;
        chunks.begin();
      }
      chunks.add(seq, data);
    },
  };
}

async function answered(turn, item, { result, streamed }) {
  stopWaiting();
  page.busy = false;
  item.querySelector(".text").textContent = result.transcript;
  item.classList.remove("failed");
  setNote(item, "");
  const options = { audioUrl: result.audio_url, degraded: result.degraded };
  if (turn.reply) replaceReply(turn.reply, result.reply, options);
  else addMessage("companion", result.reply, options);
  if (streamed && turn.audio) {
    if (chunks.refused) {
      chunks.stop();
      offerPlay();
      return;
    }
    chunks.finish();
    if (page.state !== "speaking") setState("idle", "Ready");
    return;
  }
  setState("idle", result.audio_url ? "Ready" : "Reply shown as text");
  if (result.audio_url) await playReply(result.audio_url);
}

async function playReply(url) {
  if (!(await player.play(url))) offerPlay();
}

function offerPlay() {
  const button = ui.log.lastElementChild?.querySelector(".play");
  if (button) {
    button.textContent = "Play reply";
    button.classList.add("needed");
  }
  setState("idle", "Select Play reply to hear the answer");
}

function turnFailed(failure, input, item) {
  const again = () => takeTurn(input, item);
  if (failure.code === "cancelled") {
    item.classList.add("failed");
    setNote(item, "Cancelled");
    setState("idle", "Cancelled");
    return;
  }
  if (failure.isNetwork && failure.code === "network") {
    item.classList.add("failed");
    setNote(item, "Not sent");
    wentOffline();
    showError("network", { retry: again });
    return;
  }
  let kind = problemOf(failure);
  if (kind === "text-rejected" && "audio" in input) kind = "audio-rejected";
  const seconds = failure.retryAfter ?? (kind === "rate-limited" || kind === "reply-unavailable" ? 5 : null);
  if (kind === "reply-unavailable") {
    setNote(item, "Kept; no reply yet");
  } else {
    item.classList.add("failed");
    setNote(item, "Not sent");
  }
  const retryable = !["audio-rejected", "text-rejected", "rate-limited"].includes(kind);
  showError(kind, {
    seconds: ["rate-limited", "reply-unavailable", "busy", "storage-full"].includes(kind) ? seconds : null,
    server: failure.message,
    requestId: kind === "server" ? failure.requestId : null,
    retry: retryable ? again : null,
  });
}

// -- waiting -------------------------------------------------------------------------------

function startWaiting() {
  const started = Date.now();
  ui.elapsed.textContent = "0 s";
  ui.waitingNote.textContent = "";
  ui.cancel.hidden = true;
  ui.waiting.hidden = false;
  page.waitingTimer = setInterval(() => {
    const seconds = Math.floor((Date.now() - started) / 1000);
    ui.elapsed.textContent = `${seconds} s`;
    if (seconds === LONGER_THAN_USUAL_S) {
      ui.waitingNote.textContent = "Taking longer than usual.";
      ui.cancel.hidden = false;
      setState(page.state, "Taking longer than usual");
    } else if (seconds === STILL_WORKING_S) {
      ui.waitingNote.textContent = "Still working…";
      setState(page.state, "Still working…");
    }
  }, 1000);
}

function stopWaiting() {
  clearInterval(page.waitingTimer);
  ui.waiting.hidden = true;
}

ui.cancel.addEventListener("click", () => page.turn?.abort.abort());

// -- talking -------------------------------------------------------------------------------

async function startRecording() {
  if ((page.busy && !interruptible()) || page.offline || recorder.recording || page.starting) return;
  const unavailable = recordingUnavailable();
  if (unavailable) {
    showError(unavailable);
    return;
  }
  // Inside the gesture, before anything is awaited: autoplay and the level meter need it.
  unlockPlayback();
  recorder.prepare();
  interrupt();
  clearError();
  page.starting = true;
  page.stopRequested = false;
  updateControls();
  try {
    await recorder.start();
  } catch (error) {
    page.starting = false;
    showError(error instanceof MicrophoneError ? error.kind : "mic-failed");
    return;
  }
  page.starting = false;
  setState("recording", toggleMode() ? "Recording: press again to send" : "Recording: let go to send");
  ui.countdown.hidden = false;
  const tick = () => {
    const left = Math.max(0, MAX_RECORDING_MS - recorder.elapsedMs());
    const seconds = Math.ceil(left / 1000);
    ui.countdown.textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")} left`;
    if (left === 0) stopRecording("The maximum length was reached: sent");
  };
  tick();
  page.countdownTimer = setInterval(tick, 200);
  if (page.stopRequested) stopRecording();
}

async function stopRecording(reason = "") {
  if (page.starting) {
    page.stopRequested = true;
    return;
  }
  if (!recorder.recording) return;
  clearInterval(page.countdownTimer);
  ui.countdown.hidden = true;
  const recording = await recorder.stop();
  if (recording.durationMs < MIN_RECORDING_MS || recording.blob.size === 0) {
    setState("idle", "Too short: hold the button (or the Space bar) while you speak");
    return;
  }
  const item = addMessage("user", "Voice message", { note: reason });
  await takeTurn({ audio: recording.blob, extension: recording.extension }, item);
}

function toggleRecording() {
  if (recorder.recording || page.starting) stopRecording();
  else startRecording();
}

ui.talk.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 || toggleMode()) return;
  event.preventDefault();
  ui.talk.setPointerCapture(event.pointerId);
  startRecording();
});
for (const type of ["pointerup", "pointercancel"]) {
  ui.talk.addEventListener(type, () => {
    if (!toggleMode()) stopRecording();
  });
}
ui.talk.addEventListener("contextmenu", (event) => event.preventDefault());
// Toggle mode, and Enter in either mode (a click from the keyboard has no detail).
ui.talk.addEventListener("click", (event) => {
  if (toggleMode() || event.detail === 0) toggleRecording();
});

function spaceTalks(event) {
  if (event.code !== "Space" || event.ctrlKey || event.altKey || event.metaKey) return false;
  if (ui.confirmDelete.open) return false;
  const control = event.target.closest?.("input, textarea, select, button, a, summary, [contenteditable]");
  return !control || control === ui.talk;
}

document.addEventListener("keydown", (event) => {
  if (!spaceTalks(event)) return;
  event.preventDefault();
  if (event.repeat) return; // held down: one recording, not one per repeat
  if (toggleMode()) toggleRecording();
  else startRecording();
});
document.addEventListener("keyup", (event) => {
  if (!spaceTalks(event)) return;
  event.preventDefault(); // no click on the focused button
  if (!toggleMode()) stopRecording();
});
// Any first gesture makes replies playable, typing included.
for (const type of ["pointerdown", "keydown"]) {
  document.addEventListener(type, unlockPlayback, { capture: true, once: true });
}

ui.toggle.checked = localStorage.getItem(TOGGLE_KEY) === "on";
ui.toggle.addEventListener("change", () => {
  if (recorder.recording) stopRecording();
  localStorage.setItem(TOGGLE_KEY, toggleMode() ? "on" : "off");
  updateControls();
});

// -- typing --------------------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.message.value.trim();
  if (!text || ui.send.disabled) return;
  interrupt();
  ui.message.value = "";
  const item = addMessage("user", text);
  takeTurn({ text }, item);
});

// -- sessions ------------------------------------------------------------------------------

ui.newConversation.addEventListener("click", () => {
  stopPlayback();
  forgetSession();
  page.sessionId = null;
  clearConversation();
  clearError();
  setState("idle", "New conversation");
});

ui.deleteConversation.addEventListener("click", () => ui.confirmDelete.showModal());
ui.confirmDelete.addEventListener("close", async () => {
  if (ui.confirmDelete.returnValue !== "delete" || !page.sessionId) return;
  ui.confirmDelete.returnValue = "";
  stopPlayback();
  page.busy = true;
  updateControls();
  try {
    await api.deleteSession(page.sessionId);
  } catch (failure) {
    if (failure.status !== 404) {
      page.busy = false;
      if (failure.isNetwork) wentOffline();
      showError(failure.isNetwork ? "network" : "delete-failed");
      return;
    }
  }
  page.busy = false;
  forgetSession();
  page.sessionId = null;
  clearConversation();
  setState("idle", "Conversation deleted");
});

// -- offline -------------------------------------------------------------------------------

let afterReconnect = null;

function wentOffline(then = null) {
  if (then) afterReconnect = then;
  page.offline = true;
  ui.banner.hidden = false;
  if (recorder.recording) stopRecording();
  if (page.state !== "error") setState("offline");
  updateControls();
  clearTimeout(page.probeTimer);
  page.probeTimer = setTimeout(probe, PROBE_EVERY_MS);
}

async function probe() {
  if (!navigator.onLine) return; // the online event probes
  try {
    await api.health();
  } catch {
    page.probeTimer = setTimeout(probe, PROBE_EVERY_MS);
    return;
  }
  backOnline();
}

function backOnline() {
  clearTimeout(page.probeTimer);
  page.offline = false;
  ui.banner.hidden = true;
  if (ui.error.dataset.kind === "network" && !ui.error.hidden) {
    ui.errorHelp.textContent = "The connection is back. Try again.";
  }
  if (page.state === "offline") setState("idle", "Back online");
  updateControls();
  const then = afterReconnect;
  afterReconnect = null;
  then?.();
}

window.addEventListener("offline", () => wentOffline());
window.addEventListener("online", probe);

// -- start ---------------------------------------------------------------------------------

async function start() {
  if (page.offline) wentOffline(restoreConversation);
  const unavailable = recordingUnavailable();
  if (unavailable) page.talkNote = `${PROBLEMS[unavailable].title}. You can type your message.`;
  else if ((await microphonePermission()) === "denied") page.talkNote = PROBLEMS["mic-denied"].help;
  updateControls();
  if (!page.offline) await restoreConversation();
}

start();
