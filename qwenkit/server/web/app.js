// The chat page: keeps the conversation, streams replies from the OpenAI-compatible API of the
// server that hosts it. URLs are relative, so the page also works behind a path prefix.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const els = {
  chat: $("chat"), empty: $("empty"), messages: $("messages"), error: $("error"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), modelName: $("model-name"),
  settings: $("settings"), settingsToggle: $("settings-toggle"),
  system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  apiKey: $("api-key"),
};

// localStorage can be full or disabled (private windows): the page then works but forgets on reload.
const store = {
  get(key, fallback) {
    try {
      const value = localStorage.getItem(`qwenkit.${key}`);
      return value === null ? fallback : JSON.parse(value);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(`qwenkit.${key}`, JSON.stringify(value));
    } catch { /* see above */ }
  },
};

const state = {
  messages: [],      // the conversation as the API takes it: [{role, content}], no system prompt
  model: null,       // the id GET /v1/models reports
  controller: null,  // the AbortController of the reply being streamed; null while idle
};

/** An HTTP error from the API, with the message the server put in its JSON body. */
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const key = els.apiKey.value.trim();
  return { "Content-Type": "application/json", ...(key && { Authorization: `Bearer ${key}` }) };
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    // OpenAI's shape first; FastAPI's default {"detail": ...} for errors raised outside the API.
    message = body.error?.message ?? (typeof body.detail === "string" ? body.detail : message);
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) message += " — enter the server's API key in Settings.";
  return new ApiError(response.status, message);
}

async function fetchModel() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) throw await errorFrom(response);
  const { data } = await response.json();
  if (!data?.length) throw new Error("The server lists no model.");
  return data[0].id;
}

function setModel(id) {
  state.model = id;
  els.modelName.textContent = id;
  els.modelName.classList.remove("offline");
}

/** Show the model in the header; on failure say why there, the chat itself retries on send. */
async function loadModel() {
  try {
    setModel(await fetchModel());
  } catch (err) {
    state.model = null;
    els.modelName.textContent = err.status === 401 ? "API key needed" : "offline";
    els.modelName.classList.add("offline");
    if (err.status === 401) openSettings(els.apiKey);
  }
}

/**
 * Read a Server-Sent Events body and yield, per network read, the parsed JSON of the events it
 * completed: rendering once per read, not per token, keeps fast servers from flooding the page.
 * Ends at "data: [DONE]" or when the server closes the stream.
 */
async function* sseBatches(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];  // the data lines of the event being read
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();  // a partial line waits for the next read
      const batch = [];
      for (const line of lines) {
        if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        } else if (line === "" && data.length) {  // a blank line ends an event
          const payload = data.join("\n");
          data = [];
          if (payload === "[DONE]") {
            yield batch;
            return;
          }
          batch.push(JSON.parse(payload));
        }
        // Other fields (event:, id:, retry:) and ": keep-alive" comments carry nothing we use.
      }
      if (batch.length) yield batch;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function addMessage(role, content) {
  const item = document.createElement("article");
  item.className = `message ${role}`;
  item.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  const body = document.createElement("div");
  body.className = "content";
  item.append(body);
  els.messages.append(item);
  els.empty.hidden = true;
  setContent(item, role, content);
  return item;
}

function setContent(item, role, content) {
  const body = item.querySelector(".content");
  // The user's own words are shown as typed; only the model's reply is read as markdown.
  if (role === "user") body.textContent = content;
  else renderMarkdown(body, content);
}

function addNote(item, text) {
  const note = document.createElement("p");
  note.className = "note";
  note.textContent = text;
  item.append(note);
}

function nearBottom() {
  const { scrollHeight, scrollTop, clientHeight } = els.chat;
  return scrollHeight - scrollTop - clientHeight < 80;
}

/** Follow the reply as it grows, unless the reader has scrolled up to read something else. */
function keepScrolled(wasNearBottom) {
  if (wasNearBottom) els.chat.scrollTop = els.chat.scrollHeight;
}

function setBusy(controller) {
  state.controller = controller;
  els.send.hidden = Boolean(controller);
  els.stop.hidden = !controller;
  els.stop.disabled = !controller;
  els.messages.setAttribute("aria-busy", String(Boolean(controller)));
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function save() {
  store.set("messages", state.messages);
}

async function send() {
  const text = els.prompt.value.trim();
  if (!text || state.controller) return;
  els.error.hidden = true;

  // New chat swaps in a fresh array, so a reply still finishing never lands in the new chat.
  const conversation = state.messages;
  conversation.push({ role: "user", content: text });
  const userItem = addMessage("user", text);
  els.prompt.value = "";
  autosize();
  const system = els.system.value.trim();
  const request = (system ? [{ role: "system", content: system }] : []).concat(conversation);

  const reply = { role: "assistant", content: "" };
  conversation.push(reply);
  const item = addMessage("assistant", "");
  item.classList.add("streaming");
  keepScrolled(true);
  const controller = new AbortController();
  setBusy(controller);

  let finish = null;
  let failure = null;
  try {
    if (!state.model) setModel(await fetchModel());
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: state.model, messages: request, stream: true, temperature: Number(els.temperature.value),
      }),
    });
    if (!response.ok) throw await errorFrom(response);
    for await (const chunks of sseBatches(response.body)) {
      const follow = nearBottom();
      for (const chunk of chunks) {
        if (chunk.error) throw new Error(chunk.error.message ?? "The server stopped the reply.");
        const choice = chunk.choices?.[0];
        reply.content += choice?.delta?.content ?? "";
        finish = choice?.finish_reason ?? finish;
      }
      setContent(item, "assistant", reply.content);
      keepScrolled(follow);
    }
  } catch (err) {
    // Stop aborts the fetch: not an error, the partial reply stays.
    if (err.name !== "AbortError") failure = err;
  } finally {
    item.classList.remove("streaming");
    setBusy(null);
  }
  if (conversation !== state.messages) return;  // New chat dropped this conversation meanwhile

  if (!reply.content) {
    // Nothing came back: undo the turn and give the text back, so it can be sent again.
    conversation.splice(-2);
    item.remove();
    userItem.remove();
    els.empty.hidden = els.messages.childElementCount > 0;
    if (!els.prompt.value) {
      els.prompt.value = text;
      autosize();
    }
    if (!failure && !controller.signal.aborted) failure = new Error("The server sent back an empty reply.");
  } else if (controller.signal.aborted) {
    addNote(item, "Stopped.");
  } else if (finish === "length") {
    addNote(item, "The reply reached the server's token limit.");
  }
  if (failure) {
    // fetch() rejects with a TypeError when the network request itself fails.
    showError(failure instanceof TypeError ? `Could not reach the server (${failure.message}).` : failure.message);
    if (failure.status === 401) openSettings(els.apiKey);
  }
  save();
}

function stop() {
  state.controller?.abort();
}

function newChat() {
  stop();
  state.messages = [];
  els.messages.replaceChildren();
  els.empty.hidden = false;
  els.error.hidden = true;
  save();
  els.prompt.focus();
}

function openSettings(focus) {
  els.settings.hidden = false;
  els.settingsToggle.setAttribute("aria-expanded", "true");
  focus?.focus();
}

function toggleSettings() {
  if (els.settings.hidden) {
    openSettings();
  } else {
    els.settings.hidden = true;
    els.settingsToggle.setAttribute("aria-expanded", "false");
  }
}

/** Grow the message box with its text, up to the CSS max-height. */
function autosize() {
  els.prompt.style.height = "auto";
  els.prompt.style.height = `${els.prompt.scrollHeight}px`;
}

function showTemperature() {
  els.temperatureValue.textContent = Number(els.temperature.value).toFixed(1);
}

function restore() {
  const messages = store.get("messages", []);
  state.messages = Array.isArray(messages) ? messages : [];
  for (const { role, content } of state.messages) addMessage(role, content);
  els.system.value = store.get("system", "");
  els.temperature.value = store.get("temperature", els.temperature.value);
  els.apiKey.value = store.get("apiKey", "");
  showTemperature();
  // Settings start open where there is room beside the chat; on a phone they would cover it.
  if (matchMedia("(min-width: 900px)").matches) openSettings();
  keepScrolled(true);
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
els.prompt.addEventListener("keydown", (e) => {
  // isComposing: this Enter confirms an IME candidate (Chinese, Japanese input), it must not send.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
els.prompt.addEventListener("input", autosize);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.controller) stop();
});
els.stop.addEventListener("click", stop);
els.newChat.addEventListener("click", newChat);
els.settingsToggle.addEventListener("click", toggleSettings);
// Enter in the API key field submits the settings form: the key is saved by its own events instead.
$("settings-form").addEventListener("submit", (e) => e.preventDefault());
els.system.addEventListener("input", () => store.set("system", els.system.value));
els.temperature.addEventListener("input", () => {
  showTemperature();
  store.set("temperature", els.temperature.value);
});
els.apiKey.addEventListener("input", () => store.set("apiKey", els.apiKey.value.trim()));
els.apiKey.addEventListener("change", loadModel);

restore();
loadModel();
els.prompt.focus();
