// Renders the markdown subset chat models write (fenced code, inline code, bold, italic,
// headings, lists, paragraphs) as DOM nodes. Text only ever enters the page through
// text nodes, never innerHTML, so nothing a model writes can become markup or script.

/** Replace the children of `container` with the rendered `text`. */
export function renderMarkdown(container, text) {
  container.replaceChildren(...blocks(text));
}

const FENCE = /^\s*(`{3,}|~{3,})\s*([^\s`]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
// The text may be missing: mid-stream "10." is a list item whose words have not arrived yet.
const LIST_ITEM = /^\s*(?:([-*+])|(\d+)[.)])(?:\s+(.*))?$/;

function blocks(text) {
  const out = [];
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;
  const flush = () => {
    if (paragraph.length) out.push(paragraphNode(paragraph));
    paragraph = [];
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flush();
      const body = [];
      // An unclosed fence runs to the end: mid-stream, the code shows as code while it arrives.
      for (i++; i < lines.length && !closesFence(lines[i], fence[1]); i++) body.push(lines[i]);
      out.push(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) {
      flush();
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      flush();
      // h3 and below: the page's own h1 stays the only top-level heading.
      const node = document.createElement(`h${Math.min(heading[1].length + 2, 6)}`);
      node.append(...inline(heading[2]));
      out.push(node);
      continue;
    }
    const item = line.match(LIST_ITEM);
    if (item) {
      if (paragraph.length) out.push(paragraphNode(paragraph));
      paragraph = [];
      const ordered = item[2] !== undefined;
      if (!list || (list.tagName === "OL") !== ordered) {
        list = document.createElement(ordered ? "ol" : "ul");
        if (ordered && item[2] !== "1") list.start = Number(item[2]);
        out.push(list);
      }
      const li = document.createElement("li");
      li.append(...inline(item[3] ?? ""));
      list.append(li);
      continue;
    }
    list = null;
    paragraph.push(line);
  }
  flush();
  return out;
}

function closesFence(line, opener) {
  const trimmed = line.trim();
  return trimmed.startsWith(opener) && /^[`~]+$/.test(trimmed);
}

/** Lines of one paragraph keep their line breaks: models use single newlines meaningfully. */
function paragraphNode(lines) {
  const p = document.createElement("p");
  lines.forEach((line, i) => {
    if (i) p.append(document.createElement("br"));
    p.append(...inline(line));
  });
  return p;
}

// `code`, **bold**, *italic*: the markers must hug their text, so "2 * 3 * 4" stays plain.
const INLINE = /`([^`\n]+)`|\*\*([^\s*](?:.*?[^\s*])?)\*\*|\*([^\s*](?:[^*]*?[^\s*])?)\*/g;

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    if (m[1] !== undefined) {
      const code = document.createElement("code");
      code.textContent = m[1];
      nodes.push(code);
    } else {
      const node = document.createElement(m[2] !== undefined ? "strong" : "em");
      node.append(...inline(m[2] ?? m[3]));
      nodes.push(node);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function codeBlock(code, lang) {
  const wrapper = document.createElement("div");
  wrapper.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.textContent = lang || "code";
  head.append(label);
  // The clipboard API exists only in secure contexts (https, localhost): no button elsewhere.
  if (navigator.clipboard) {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", `Copy ${lang || "code"} to the clipboard`);
    copy.addEventListener("click", async () => {
      await navigator.clipboard.writeText(code);
      copy.textContent = "Copied";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
    head.append(copy);
  }
  const pre = document.createElement("pre");
  const codeEl = document.createElement("code");
  if (lang) codeEl.className = `language-${lang}`;
  codeEl.textContent = code;
  pre.append(codeEl);
  wrapper.append(head, pre);
  return wrapper;
}
