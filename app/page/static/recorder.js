// The microphone: permission, the recording format, the input level.
//
// The format is negotiated with MediaRecorder.isTypeSupported, mp4 first on Apple's WebKit
// (Safari claims webm from 18.4 and writes broken files), webm/opus first elsewhere; the
// app reads the real format from the bytes. The stream stays open between recordings for
// a minute, so that the first syllable of the next one is not lost while the microphone
// starts again; it is released when the page is hidden.

const APPLE_WEBKIT = /AppleWebKit/.test(navigator.userAgent) && !/Chrome|Chromium|Edg|Firefox/.test(navigator.userAgent);
const FORMATS = APPLE_WEBKIT
  ? ["audio/mp4;codecs=mp4a.40.2", "audio/mp4", "audio/webm;codecs=opus", "audio/webm"]
  : ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"];
const EXTENSIONS = { "audio/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "m4a" };
const RELEASE_AFTER_MS = 60000;

/** Why this browser cannot record at all, or null: "insecure" or "unsupported". */
export function recordingUnavailable() {
  if (!window.isSecureContext) return "insecure";
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") return "unsupported";
  return FORMATS.some((type) => MediaRecorder.isTypeSupported(type)) ? null : "unsupported";
}

/** The microphone permission's state when the browser tells it ("granted", "denied", "prompt"), else null. */
export async function microphonePermission() {
  try {
    return (await navigator.permissions.query({ name: "microphone" })).state;
  } catch {
    return null;
  }
}

/** getUserMedia's failures, told apart: "mic-denied", "mic-none", "mic-busy", "mic-failed". */
export function microphoneProblem(error) {
  switch (error?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "mic-denied";
    case "NotFoundError":
    case "OverconstrainedError":
      return "mic-none";
    case "NotReadableError":
    case "AbortError":
      return "mic-busy";
    default:
      return "mic-failed";
  }
}

export class MicrophoneError extends Error {
  constructor(kind) {
    super(kind);
    this.kind = kind;
  }
}

export class Recorder {
  constructor({ onLevel }) {
    this.onLevel = onLevel;
    this.stream = null;
    this.audioContext = null;
    this.analyser = null;
    this.recorder = null;
    this.releaseTimer = null;
    document.addEventListener("visibilitychange", () => {
      if (document.hidden && !this.recording) this.release();
    });
  }

  get recording() {
    return this.recorder !== null;
  }

  /** Inside the user's gesture: an AudioContext created there may run (autoplay rules). */
  prepare() {
    if (!this.audioContext && window.AudioContext) this.audioContext = new AudioContext();
    this.audioContext?.resume().catch(() => {});
  }

  async start() {
    clearTimeout(this.releaseTimer);
    if (!this.stream) {
      try {
        this.stream = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        });
      } catch (error) {
        throw new MicrophoneError(microphoneProblem(error));
      }
      this.stream.getAudioTracks()[0]?.addEventListener("ended", () => this.release());
      this.connectMeter();
    }
    const type = FORMATS.find((candidate) => MediaRecorder.isTypeSupported(candidate));
    const recorder = new MediaRecorder(this.stream, type ? { mimeType: type } : {});
    const chunks = [];
    recorder.addEventListener("dataavailable", (event) => {
      if (event.data.size > 0) chunks.push(event.data);
    });
    this.done = new Promise((resolve) => {
      recorder.addEventListener("stop", () => {
        const mime = recorder.mimeType || type || "audio/webm";
        const base = mime.split(";")[0];
        resolve({
          blob: new Blob(chunks, { type: mime }),
          extension: EXTENSIONS[base] ?? "webm",
          durationMs: performance.now() - this.startedAt,
        });
      });
    });
    this.recorder = recorder;
    this.startedAt = performance.now();
    recorder.start();
    this.meter();
  }

  /** The recording so far: {blob, extension, durationMs}. */
  async stop() {
    const recorder = this.recorder;
    if (!recorder) return null;
    this.recorder = null;
    if (recorder.state !== "inactive") recorder.stop();
    const recording = await this.done;
    this.onLevel(0);
    this.releaseTimer = setTimeout(() => this.release(), RELEASE_AFTER_MS);
    return recording;
  }

  elapsedMs() {
    return this.recorder ? performance.now() - this.startedAt : 0;
  }

  release() {
    clearTimeout(this.releaseTimer);
    this.stream?.getTracks().forEach((track) => track.stop());
    this.stream = null;
    this.analyser = null;
  }

  connectMeter() {
    if (!this.audioContext) return;
    const source = this.audioContext.createMediaStreamSource(this.stream);
    this.analyser = this.audioContext.createAnalyser();
    this.analyser.fftSize = 1024;
    source.connect(this.analyser);
  }

  meter() {
    const samples = this.analyser ? new Float32Array(this.analyser.fftSize) : null;
    const tick = () => {
      if (!this.recorder) return;
      if (this.analyser && samples) {
        this.analyser.getFloatTimeDomainData(samples);
        let sum = 0;
        for (const sample of samples) sum += sample * sample;
        // RMS of speech sits around 0.01-0.3: a square root spreads it over the bar.
        this.onLevel(Math.min(1, Math.sqrt(Math.sqrt(sum / samples.length)) * 1.6));
      }
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }
}
