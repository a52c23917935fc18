// The portal's one script: small, progressive enhancements only. Every page
// works without it (forms post, links link); with it, pages update live.
// No inline script anywhere: behaviour hangs off data-* attributes.
"use strict";

(function () {
  const csrf = () => {
    const m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.content : "";
  };

  // <select data-autosubmit>: submit its form on change.
  document.querySelectorAll("select[data-autosubmit]").forEach((s) => {
    s.addEventListener("change", () => s.form && s.form.submit());
  });

  // <form data-confirm="text">: ask first.
  document.querySelectorAll("form[data-confirm]").forEach((f) => {
    f.addEventListener("submit", (e) => {
      if (!window.confirm(f.dataset.confirm)) e.preventDefault();
    });
  });

  // <button data-copy="#id">: copy that element's text.
  document.querySelectorAll("[data-copy]").forEach((b) => {
    b.addEventListener("click", () => {
      const el = document.querySelector(b.dataset.copy);
      if (!el) return;
      const text = el.value !== undefined && el.tagName === "INPUT" ? el.value : el.textContent;
      const done = () => {
        const was = b.textContent;
        b.textContent = "Copied";
        setTimeout(() => (b.textContent = was), 1500);
      };
      if (navigator.clipboard) {
        navigator.clipboard.writeText(text.trim()).then(done, () => {});
      } else {
        const r = document.createRange();
        r.selectNodeContents(el);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(r);
        document.execCommand("copy");
        done();
      }
    });
  });

  // <div data-refresh="url" data-every="ms">: replace its content with the
  // fragment at url, every so often (lists whose states change).
  document.querySelectorAll("[data-refresh]").forEach((el) => {
    const every = parseInt(el.dataset.every || "2000", 10);
    const tick = () => {
      if (document.hidden) return;
      fetch(el.dataset.refresh, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => {
          if (el.innerHTML !== html) el.innerHTML = html;
        })
        .catch(() => {});
    };
    setInterval(tick, every);
  });

  // <div data-wait="url">: poll url (JSON {"ready": bool, "message": text,
  // "href": link}) until ready, then show the message as a link.
  document.querySelectorAll("[data-wait]").forEach((el) => {
    const status = el.querySelector("[data-wait-status]") || el;
    const timer = setInterval(() => {
      fetch(el.dataset.wait, { credentials: "same-origin" })
        .then((r) => r.json())
        .then((s) => {
          status.textContent = s.message;
          if (s.ready) {
            clearInterval(timer);
            if (s.href) {
              const a = document.createElement("a");
              a.href = s.href;
              a.textContent = "Open " + (s.name || "it");
              status.appendChild(document.createTextNode(" "));
              status.appendChild(a);
            }
            el.classList.add("ready");
          }
        })
        .catch(() => {});
    }, 1000);
  });

  // A task's page: <div id="log" data-events="url"> receives the task's events
  // (server-sent): each `log` appends a line, each `task`/`end` updates the
  // steps and state; the stream ends with the task.
  const log = document.getElementById("log");
  if (log && log.dataset.events) {
    const follow = document.getElementById("follow");
    const lines = new Set();
    log.querySelectorAll("li[data-id]").forEach((li) => lines.add(li.dataset.id));
    const atBottom = () => window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    // Lines go to their machine's section (a <details> that folds), server
    // lines to the server's.
    const section = (machine) => {
      const key = machine === null || machine === undefined ? "server" : String(machine);
      return (
        log.querySelector(`ol[data-machine="${CSS.escape(key)}"]`) ||
        log.querySelector('ol[data-machine="server"]')
      );
    };
    const addLine = (l) => {
      const id = String(l.id);
      if (lines.has(id)) return;
      lines.add(id);
      const stick = atBottom();
      const li = document.createElement("li");
      li.id = "L" + id;
      li.dataset.id = id;
      li.className = "line " + l.stream;
      const n = document.createElement("a");
      n.href = "#L" + id;
      n.className = "n";
      n.textContent = String(lines.size);
      const t = document.createElement("time");
      t.dateTime = new Date(l.timestamp).toISOString();
      // UTC, as the server writes the lines it renders.
      t.textContent = new Date(l.timestamp).toISOString().slice(11, 19);
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = l.text;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = l.machine_name || "";
      li.append(n, t, who, text);
      section(l.machine_id).appendChild(li);
      if (stick && (!follow || follow.checked)) li.scrollIntoView({ block: "end" });
    };
    // As the server writes them: "12:04:05" (UTC) and "1.2 s" / "3 min 4 s".
    const clock = (ms) => new Date(ms).toISOString().slice(11, 19);
    const took = (start, end) => {
      if (start === null || start === undefined) return "";
      const ms = Math.max(0, (end === null || end === undefined ? Date.now() : end) - start);
      return ms < 60000
        ? (ms / 1000).toFixed(1) + " s"
        : Math.floor(ms / 60000) + " min " + Math.floor((ms % 60000) / 1000) + " s";
    };
    const setState = (view) => {
      const st = document.getElementById("task-state");
      if (st) {
        st.textContent = view.task.state;
        st.className = "state " + view.task.state.toLowerCase();
      }
      const tt = document.getElementById("task-took");
      if (tt) tt.textContent = took(view.task.started_at, view.task.completed_at);
      view.steps.forEach((step) => {
        const row = document.querySelector(`tr[data-machine="${CSS.escape(String(step.machine_id))}"]`);
        if (!row) return;
        const cell = (k) => row.querySelector(`[data-k="${k}"]`);
        if (cell("state")) {
          cell("state").textContent = step.state;
          cell("state").className = "state " + step.state.toLowerCase();
        }
        if (cell("exit")) cell("exit").textContent = step.exit_code === null ? "" : String(step.exit_code);
        if (cell("started")) cell("started").textContent = step.started_at ? clock(step.started_at) : "";
        if (cell("took")) cell("took").textContent = took(step.started_at, step.completed_at);
        if (cell("error")) cell("error").textContent = step.error || "";
        // Retry / Ignore / Fail show while the machine waits for a decision.
        if (cell("guide")) {
          cell("guide").hidden = !(step.state === "Executing" && (step.error || "").startsWith("waiting for guidance"));
        }
      });
      const actions = document.getElementById("task-actions");
      if (actions && ["Success", "Failed", "Canceled"].includes(view.task.state)) actions.hidden = true;
    };
    const names = {};
    document.querySelectorAll("tr[data-machine]").forEach((r) => (names[r.dataset.machine] = r.dataset.name));
    const es = new EventSource(log.dataset.events);
    es.addEventListener("log", (e) => {
      const l = JSON.parse(e.data);
      l.machine_name = l.machine_id === null ? "server" : names[String(l.machine_id)] || "";
      addLine(l);
    });
    es.addEventListener("task", (e) => setState(JSON.parse(e.data)));
    es.addEventListener("end", (e) => {
      setState(JSON.parse(e.data));
      es.close();
      document.body.classList.add("task-ended");
    });
    es.onerror = () => {
      if (document.body.classList.contains("task-ended")) es.close();
    };
  }

  // <form data-upload>: send the file with a progress bar (the page would
  // otherwise wait silently on a large upload).
  document.querySelectorAll("form[data-upload]").forEach((f) => {
    f.addEventListener("submit", (e) => {
      const input = f.querySelector('input[type="file"]');
      if (!input || !input.files.length || !window.XMLHttpRequest) return;
      e.preventDefault();
      const file = input.files[0];
      const bar = f.querySelector("progress");
      const out = f.querySelector("[data-upload-status]");
      const xhr = new XMLHttpRequest();
      const url = f.dataset.upload + "?file_name=" + encodeURIComponent(file.name) +
        (f.querySelector('input[name="replace"]:checked') ? "&replace=true" : "");
      xhr.open("POST", url);
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.onprogress = (p) => {
        if (bar && p.lengthComputable) {
          bar.max = p.total;
          bar.value = p.loaded;
        }
        if (out && p.lengthComputable) out.textContent = Math.round((100 * p.loaded) / p.total) + "%";
      };
      xhr.onload = () => {
        let msg = "";
        try {
          const body = JSON.parse(xhr.responseText);
          msg = body.error || (body.package ? body.package.package_id + " " + body.package.version + ": " + body.outcome : "");
        } catch (_) {
          msg = xhr.statusText;
        }
        if (out) out.textContent = msg;
        if (xhr.status >= 200 && xhr.status < 300) window.location.reload();
      };
      xhr.onerror = () => out && (out.textContent = "The upload failed: the connection was lost.");
      xhr.send(file);
    });
  });
})();
