// Reply playback through one audio element, made playable inside the person's first
// gesture (autoplay rules: iOS only lets an element play later if it played in a gesture)
// and reused for every reply. A play() that is refused or fails is tried once more; a
// play() that never settles counts as refused after a few seconds, so the page never hangs
// on it. What then? The caller shows a "Play reply" button.

const SETTLE_MS = 4000;

// 50 ms of silence as a WAV, from a blob: URL (the page's CSP allows media from blob: and
// its own origin only).
function silence() {
  const samples = 400;
  const buffer = new ArrayBuffer(44 + samples * 2);
  const view = new DataView(buffer);
  const text = (offset, value) => [...value].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples * 2, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true);
  view.setUint16(22, 1, true);
  view.setUint32(24, 8000, true);
  view.setUint32(28, 16000, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, samples * 2, true);
  return URL.createObjectURL(new Blob([buffer], { type: "audio/wav" }));
}

function settled(promise) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error("play() did not settle")), SETTLE_MS)),
  ]);
}

export class Player {
  constructor({ onPlaying, onStopped }) {
    this.audio = new Audio();
    this.audio.preload = "auto";
    this.unlocked = false;
    this.current = null; // what plays as a reply (the unlocking silence is none)
    this.onPlaying = onPlaying;
    this.onStopped = onStopped;
    this.audio.addEventListener("playing", () => {
      if (this.current) this.onPlaying();
    });
    this.audio.addEventListener("ended", () => this.stop());
  }

  /** Call inside a user gesture (pointerdown, keydown, click, submit): once is enough. */
  unlock() {
    if (this.unlocked) return;
    this.unlocked = true;
    const url = silence();
    this.audio.muted = true;
    this.audio.src = url;
    this.audio
      .play()
      .catch(() => {})
      .finally(() => {
        this.audio.muted = false;
        URL.revokeObjectURL(url);
      });
  }

  /** Plays `url`; true when it plays, false when it was refused twice. */
  async play(url) {
    for (let attempt = 0; attempt < 2; attempt += 1) {
      this.stop();
      this.audio.muted = false;
      this.audio.src = url;
      this.current = url;
      try {
        await settled(this.audio.play());
        return true;
      } catch {
        // Refused (no gesture yet) or the audio failed to load: once more, then the button.
      }
    }
    this.stop();
    return false;
  }

  /** Stops a reply playing (the browser's voice too); onStopped when one was. */
  stop() {
    const wasPlaying = this.current !== null;
    this.current = null;
    if (!this.audio.paused) this.audio.pause();
    if (window.speechSynthesis?.speaking) window.speechSynthesis.cancel();
    if (wasPlaying) this.onStopped();
  }

  /** The browser's own voice, for a reply that came without speech. */
  speak(text) {
    if (!window.speechSynthesis || !window.SpeechSynthesisUtterance) return false;
    this.stop();
    const utterance = new SpeechSynthesisUtterance(text);
    this.current = utterance;
    utterance.addEventListener("start", () => this.onPlaying());
    const ended = () => {
      if (this.current === utterance) this.stop();
    };
    utterance.addEventListener("end", ended);
    utterance.addEventListener("error", ended);
    window.speechSynthesis.speak(utterance);
    return true;
  }
}

export const canSpeak = () => Boolean(window.speechSynthesis && window.SpeechSynthesisUtterance);

/**
 * A streamed reply's audio: each chunk (a self-contained MP3) decoded on one AudioContext
 * and scheduled right after the one before it (start = max(now, end of the previous)), in
 * seq order whatever order the decoding finishes in. The context is made and resumed inside
 * the person's first gesture (`unlock`); one that is still not running when a reply comes
 * means the browser refused to play it (`refused`), and the caller offers "Play reply".
 */
export class ChunkPlayer {
  constructor({ onPlaying, onStopped }) {
    this.context = null;
    this.turn = null;
    this.onPlaying = onPlaying;
    this.onStopped = onStopped;
  }

  unlock() {
    if (!this.context) {
      this.context = new (window.AudioContext ?? window.webkitAudioContext)();
      // Chunks scheduled while it was still starting play now.
      this.context.addEventListener("statechange", () => {
        if (this.turn?.sources.size && !this.refused) this.started(this.turn);
      });
    }
    this.context.resume().catch(() => {});
  }

  get refused() {
    return this.context?.state !== "running";
  }

  /** A new streamed reply: what was playing stops. */
  begin() {
    this.stop();
    if (!this.context) this.unlock();
    this.turn = {
      next: 0, // the seq to schedule next
      decoding: 0, // chunks still being decoded
      decoded: new Map(), // seq -> AudioBuffer (null: undecodable), waiting for the ones before
      end: 0, // when the last scheduled chunk ends, on the context's clock
      sources: new Set(), // scheduled or playing
      started: false,
      finished: false, // its `done` came: no more chunks
    };
  }

  /** The `audio` event's chunk: base64 MP3 bytes, its place `seq`. */
  add(seq, data) {
    const turn = this.turn;
    if (!turn) return;
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    turn.decoding += 1;
    const settled = (buffer) => {
      if (this.turn !== turn) return; // stopped (barge-in) or replaced meanwhile
      turn.decoding -= 1;
      turn.decoded.set(seq, buffer);
      this.schedule(turn);
    };
    // A chunk that cannot be decoded is skipped, not waited for: the ones after it still play.
    this.context.decodeAudioData(bytes.buffer).then(settled, () => settled(null));
  }

  schedule(turn) {
    while (turn.decoded.has(turn.next)) {
      const buffer = turn.decoded.get(turn.next);
      turn.decoded.delete(turn.next);
      turn.next += 1;
      if (!buffer) continue;
      const source = this.context.createBufferSource();
      source.buffer = buffer;
      source.connect(this.context.destination);
      const at = Math.max(this.context.currentTime, turn.end);
      source.start(at);
      turn.end = at + buffer.duration;
      turn.sources.add(source);
      source.addEventListener("ended", () => {
        turn.sources.delete(source);
        this.settle(turn);
      });
      if (!this.refused) this.started(turn);
    }
  }

  started(turn) {
    if (turn.started) return;
    turn.started = true;
    this.onPlaying();
  }

  /** No more chunks will come for this reply (its `done`). */
  finish() {
    if (!this.turn) return;
    this.turn.finished = true;
    this.settle(this.turn);
  }

  settle(turn) {
    if (this.turn === turn && turn.finished && turn.sources.size === 0 && turn.decoding === 0) {
      this.turn = null;
      this.onStopped();
    }
  }

  /** A streamed reply has started to play and is not over. */
  get playing() {
    return Boolean(this.turn?.started) && !this.refused;
  }

  /** Stops every chunk at once, scheduled or playing; later chunks of the reply are dropped. */
  stop() {
    const turn = this.turn;
    this.turn = null;
    if (!turn) return;
    for (const source of turn.sources) {
      source.stop();
      source.disconnect();
    }
    turn.sources.clear();
    this.onStopped();
  }
}
