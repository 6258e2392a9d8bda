// The operator console: one page over the bridge's own HTTP API (docs/console.md).
//
// The admin token lives in this tab's sessionStorage and travels only as an Authorization
// header: never in a URL, a cookie or a log. Streams are read with fetch (EventSource cannot
// send headers) and resume with Last-Event-ID, so a reconnect neither loses nor repeats a line.
'use strict';

(() => {
  const TOKEN_KEY = 'acc.console.token';
  const TERMINAL = new Set(['succeeded', 'dead_lettered', 'cancelled']);
  const STATES = ['queued', 'dispatched', 'running', 'retrying', 'succeeded', 'dead_lettered', 'cancelled'];
  const PRIORITIES = [1, 2, 3, 4, 5];
  /// Pages of 500 read for the task counts; past them the counts say they are partial.
  const COUNT_PAGES = 4;
  const TAIL_LINES = 500;
  const LATENCY_POINTS = 120;
  const DASHES = ['', '6 3', '2 2', '8 2 2 2', '1 3', '10 4'];
  const COLOURS = ['#0b5cad', '#cf222e', '#1a7f37', '#8250df', '#9a6700', '#57606a'];

  let token = sessionStorage.getItem(TOKEN_KEY);
  let current = null;

  const $ = (selector) => document.querySelector(selector);

  /** An element with attributes and children (strings become text, never HTML). */
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function statusBadge(status) {
    return el('span', { class: `status ${status}` }, String(status).replace('_', ' '));
  }

  function when(timestamp) {
    if (!timestamp) return '—';
    const at = new Date(timestamp);
    if (Number.isNaN(at.getTime())) return String(timestamp);
    const seconds = Math.round((Date.now() - at.getTime()) / 1000);
    const ago = seconds < 1 ? 'now'
      : seconds < 90 ? `${seconds} s ago`
        : seconds < 5400 ? `${Math.round(seconds / 60)} min ago`
          : `${Math.round(seconds / 3600)} h ago`;
    return el('time', { datetime: at.toISOString(), title: at.toISOString() }, ago);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function notice(text) {
    const node = $('#notice');
    node.textContent = text || '';
    node.hidden = !text;
  }

  // ---- the API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** What an operator should read for a refusal of their token. */
  function explain(error) {
    if (error.status === 0) return `Cannot reach the bridge (${error.message}).`;
    if (error.code === 'TOKEN_EXPIRED') return 'This token has expired: paste a fresh admin token.';
    if (error.code === 'MISSING_TOKEN') return 'Paste an admin token to sign in.';
    if (error.status === 401) return `The bridge refused this token (${error.code}): ${error.message}`;
    if (error.code === 'INSUFFICIENT_SCOPE') {
      return `This token is valid but may not use the console (${error.code}): ${error.message}`;
    }
    return `${error.code}: ${error.message}`;
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (err) {
      throw new ApiError(0, 'UNREACHABLE', err.message);
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = new ApiError(
        response.status,
        (data && data.error && data.error.code) || `HTTP_${response.status}`,
        (data && data.error && data.error.message) || response.statusText,
      );
      if (response.status === 401) signOut(explain(error));
      throw error;
    }
    return data;
  }

  /** Runs an action of a button; a refusal is shown, not thrown. */
  async function act(button, action) {
    button.disabled = true;
    try {
      await action();
      notice('');
    } catch (err) {
      notice(err instanceof ApiError ? explain(err) : String(err));
    } finally {
      button.disabled = false;
    }
  }

  // ---- Server-Sent Events over fetch ----------------------------------------------------------

  /** One stream that reconnects by itself and resumes after the last id it saw. */
  class Stream {
    constructor(path, { onEvent, onState }) {
      this.path = path;
      this.onEvent = onEvent;
      this.onState = onState || (() => {});
      this.lastId = null;
      this.running = false;
    }

    start() {
      if (this.running) return;
      this.running = true;
      this.loop();
    }

    stop() {
      this.running = false;
      if (this.controller) this.controller.abort();
      this.onState('stopped');
    }

    async loop() {
      let delay = 500;
      while (this.running) {
        this.controller = new AbortController();
        const headers = { Authorization: `Bearer ${token}`, Accept: 'text/event-stream' };
        if (this.lastId !== null) headers['Last-Event-ID'] = this.lastId;
        try {
          const response = await fetch(this.path, {
            headers,
            signal: this.controller.signal,
            cache: 'no-store',
          });
          if (!response.ok) {
            let code = `HTTP_${response.status}`;
            try {
              code = (await response.json()).error.code;
            } catch {
              // keep the status
            }
            if (response.status === 401) {
              signOut(explain(new ApiError(401, code, 'the stream was refused')));
              return;
            }
            this.onState(`refused (${code}), retrying`);
          } else {
            this.onState('live');
            delay = 500;
            await this.read(response.body);
          }
        } catch (err) {
          if (!this.running) return;
        }
        if (!this.running) return;
        this.onState('reconnecting');
        await sleep(delay);
        delay = Math.min(delay * 2, 10000);
      }
    }

    async read(body) {
      const reader = body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let type = '';
      let data = [];
      let id = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, end).replace(/\r$/, '');
          buffer = buffer.slice(end + 1);
          if (line === '') {
            if (id !== null) this.lastId = id;
            if (data.length) this.onEvent({ type: type || 'message', data: data.join('\n'), id });
            type = '';
            data = [];
            id = null;
            continue;
          }
          if (line.startsWith(':')) continue;
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'data') data.push(text);
          else if (field === 'event') type = text;
          else if (field === 'id') id = text;
        }
      }
    }
  }

  function liveLabel(selector) {
    return (state) => {
      const node = $(selector);
      if (node) node.textContent = `live: ${state}`;
    };
  }

  // ---- Agents --------------------------------------------------------------------------------

  const agents = {
    rows: new Map(),
    stream: null,
    timer: null,

    async enter() {
      if (!this.stream) {
        this.stream = new Stream('/orchestrator/agents/stream', {
          onEvent: (event) => this.change(event),
          onState: (state) => {
            liveLabel('#agents-live')(state);
            // A (re)connected stream carries changes from now on: read the list afresh.
            if (state === 'live') this.load().catch(() => {});
          },
        });
      }
      this.stream.start();
      this.timer = setInterval(() => this.render(), 5000);
    },

    leave() {
      if (this.stream) this.stream.stop();
      clearInterval(this.timer);
    },

    async load() {
      const body = await api('GET', '/orchestrator/agents');
      this.rows = new Map(body.agents.map((agent) => [agent.agent_id, agent]));
      this.render();
    },

    change(event) {
      if (event.type !== 'message') return;
      let change;
      try {
        change = JSON.parse(event.data);
      } catch {
        return;
      }
      const row = this.rows.get(change.agent_id);
      if (!row) {
        this.load().catch(() => {});
        return;
      }
      row.status = change.to;
      if (change.reason !== 'stale') row.last_seen = change.at;
      this.render();
    },

    render() {
      const list = [...this.rows.values()].sort((a, b) => a.agent_id.localeCompare(b.agent_id));
      const counts = {};
      for (const agent of list) counts[agent.status] = (counts[agent.status] || 0) + 1;
      $('#agents-summary').textContent = `${list.length} in all` + Object.entries(counts)
        .map(([status, n]) => `, ${n} ${status}`).join('');
      $('#agents-table tbody').replaceChildren(...list.map((agent) => el('tr', { 'data-agent': agent.agent_id },
        el('td', { class: 'id' }, agent.agent_id),
        el('td', { 'data-status': agent.status }, statusBadge(agent.status)),
        el('td', {}, when(agent.last_seen)),
        el('td', {}, agent.capabilities ? agent.capabilities.join(', ') : String(agent.capabilities_count)),
        el('td', {}, agent.name || ''),
      )));
      if (!list.length) {
        $('#agents-table tbody').replaceChildren(el('tr', {}, el('td', { colspan: 5 }, 'No agent has registered yet.')));
      }
    },
  };

  // ---- Tasks ---------------------------------------------------------------------------------

  const tasks = {
    timer: null,
    selected: null,
    filter: new URLSearchParams(),

    async enter() {
      await this.refresh();
      this.timer = setInterval(() => this.refresh().catch(() => {}), 3000);
    },

    leave() {
      clearInterval(this.timer);
    },

    async refresh() {
      await Promise.all([this.counts(), this.list(), this.deadLetters(), this.detail()]);
    },

    async counts() {
      const byState = Object.fromEntries(STATES.map((s) => [s, 0]));
      const matrix = Object.fromEntries(STATES.map((s) => [s, Object.fromEntries(PRIORITIES.map((p) => [p, 0]))]));
      let cursor = null;
      let pages = 0;
      let seen = 0;
      do {
        const query = new URLSearchParams({ limit: '500' });
        if (cursor) query.set('cursor', cursor);
        const body = await api('GET', `/orchestrator/tasks?${query}`);
        for (const task of body.tasks) {
          byState[task.status] = (byState[task.status] || 0) + 1;
          if (matrix[task.status] && matrix[task.status][task.priority] !== undefined) {
            matrix[task.status][task.priority] += 1;
          }
          seen += 1;
        }
        cursor = body.next_cursor || null;
        pages += 1;
      } while (cursor && pages < COUNT_PAGES);
      $('#task-counts').replaceChildren(...STATES.map((s) => el('div', { class: 'card', 'data-state': s },
        el('b', {}, byState[s]), statusBadge(s))));
      $('#task-matrix').replaceChildren(
        el('thead', {}, el('tr', {}, el('th', {}, 'State \\ priority'), PRIORITIES.map((p) => el('th', {}, `P${p}`)))),
        el('tbody', {}, STATES.map((s) => el('tr', {}, el('th', {}, s.replace('_', ' ')),
          PRIORITIES.map((p) => el('td', {}, matrix[s][p]))))),
      );
      $('#task-counts-note').textContent = cursor
        ? `Counted over the first ${seen} tasks (in task-id order); more exist.`
        : `Tasks in all: ${seen}.`;
    },

    async list() {
      const query = new URLSearchParams(this.filter);
      query.set('limit', '100');
      const body = await api('GET', `/orchestrator/tasks?${query}`);
      const rows = body.tasks.map((task) => el('tr', {
        'data-task': task.task_id,
        class: task.task_id === this.selected ? 'selected' : undefined,
      },
      el('td', { class: 'id' }, task.task_id),
      el('td', { 'data-status': task.status }, statusBadge(task.status)),
      el('td', {}, task.capability),
      el('td', {}, `P${task.priority}`),
      el('td', {}, task.tenant),
      el('td', {}, `${task.attempt} / ${task.max_attempts}`),
      el('td', {}, when(task.submitted_at)),
      el('td', {}, el('button', { type: 'button', onclick: () => this.select(task.task_id) }, 'Details'),
        TERMINAL.has(task.status) ? null : el('button', {
          type: 'button',
          class: 'danger',
          'data-action': 'cancel',
          onclick: (e) => act(e.currentTarget, () => this.cancel(task.task_id)),
        }, 'Cancel'))));
      $('#tasks-table tbody').replaceChildren(...(rows.length ? rows
        : [el('tr', {}, el('td', { colspan: 8 }, 'No task matches.'))]));
      $('#tasks-more').textContent = body.next_cursor ? 'Showing the first 100; narrow the filter to see others.' : '';
    },

    async deadLetters() {
      const body = await api('GET', '/orchestrator/dlq?limit=100');
      $('#dlq-summary').textContent = `${body.count}${body.next_cursor ? '+' : ''} task(s)`;
      const rows = body.tasks.map((task) => el('tr', { 'data-task': task.task_id },
        el('td', { class: 'id' }, task.task_id),
        el('td', {}, task.capability),
        el('td', {}, task.reason || ''),
        el('td', {}, String((task.attempts || []).length)),
        el('td', {}, when(task.dead_lettered_at)),
        el('td', {}, el('button', {
          type: 'button',
          'data-action': 'replay',
          onclick: (e) => act(e.currentTarget, () => this.replay(task.task_id)),
        }, 'Replay'))));
      $('#dlq-table tbody').replaceChildren(...(rows.length ? rows
        : [el('tr', {}, el('td', { colspan: 6 }, 'The dead-letter queue is empty.'))]));
    },

    async select(taskId) {
      this.selected = taskId;
      await this.detail();
      await this.list();
    },

    async detail() {
      const node = $('#task-detail');
      if (!this.selected) {
        node.hidden = true;
        return;
      }
      const task = await api('GET', `/orchestrator/tasks/${encodeURIComponent(this.selected)}`);
      node.hidden = false;
      node.replaceChildren(...[
        el('h3', {}, 'Task ', el('code', {}, task.task_id), ' ', statusBadge(task.status)),
        el('p', {}, `${task.capability}, priority ${task.priority}, tenant ${task.tenant}, submitted by ${task.submitted_by}, attempt ${task.attempt} of ${task.max_attempts}`),
        task.reason ? el('p', {}, `Reason: ${task.reason}`) : null,
        el('div', { class: 'scroll' }, el('table', {},
          el('thead', {}, el('tr', {}, ['Attempt', 'Agent', 'Started', 'Ended', 'Outcome', 'Error'].map((h) => el('th', {}, h)))),
          el('tbody', {}, (task.attempts || []).map((attempt) => el('tr', {},
            el('td', {}, attempt.attempt),
            el('td', { class: 'id' }, attempt.agent_id),
            el('td', {}, when(attempt.started_at)),
            el('td', {}, when(attempt.ended_at)),
            el('td', {}, statusBadge(attempt.outcome)),
            el('td', {}, attempt.error ? (attempt.error.message || JSON.stringify(attempt.error)) : '')))))),
        task.result !== undefined && task.result !== null
          ? [el('h4', {}, 'Result'), el('pre', {}, JSON.stringify(task.result, null, 2))] : null,
        task.error ? [el('h4', {}, 'Error'), el('pre', {}, JSON.stringify(task.error, null, 2))] : null,
        el('button', { type: 'button', onclick: () => { this.selected = null; this.detail(); this.list(); } }, 'Close'),
      ].flat().filter(Boolean));
    },

    async cancel(taskId) {
      await api('POST', `/orchestrator/tasks/${encodeURIComponent(taskId)}/cancel`);
      await this.refresh();
    },

    async replay(taskId) {
      await api('POST', `/orchestrator/dlq/${encodeURIComponent(taskId)}/replay`);
      await this.refresh();
    },
  };

  // ---- Alerts --------------------------------------------------------------------------------

  const alerts = {
    stream: null,
    timer: null,
    pending: null,

    async enter() {
      if (!this.stream) {
        this.stream = new Stream('/orchestrator/alerts/stream', {
          onEvent: () => this.soon(),
          onState: (state) => {
            liveLabel('#alerts-live')(state);
            if (state === 'live') this.soon();
          },
        });
      }
      this.stream.start();
      await this.load();
      // Acks and silences from elsewhere are not notifications: look again now and then.
      this.timer = setInterval(() => this.load().catch(() => {}), 5000);
    },

    leave() {
      if (this.stream) this.stream.stop();
      clearInterval(this.timer);
    },

    soon() {
      clearTimeout(this.pending);
      this.pending = setTimeout(() => this.load().catch(() => {}), 200);
    },

    async load() {
      const [body, silences] = await Promise.all([
        api('GET', '/orchestrator/alerts'),
        api('GET', '/orchestrator/silences'),
      ]);
      const labels = (alert) => Object.entries(alert.labels || {})
        .filter(([name]) => name !== 'alertname' && name !== 'severity')
        .map(([name, value]) => `${name}=${value}`).join(', ');
      const active = (body.active || []).map((alert) => el('tr', { 'data-alert': alert.id },
        el('td', {}, alert.rule, el('br'), el('small', { class: 'muted' }, (alert.annotations && alert.annotations.summary) || '')),
        el('td', {}, statusBadge(alert.severity)),
        el('td', {}, statusBadge(alert.phase)),
        el('td', { class: 'id' }, labels(alert)),
        el('td', {}, when(alert.fired_at || alert.active_since)),
        el('td', { 'data-acknowledged': alert.acknowledged ? 'yes' : 'no' }, alert.acknowledged
          ? `by ${alert.acknowledged.acked_by}, ` : 'no', alert.acknowledged ? when(alert.acknowledged.acked_at) : null),
        el('td', {},
          alert.acknowledged ? null : el('button', {
            type: 'button',
            'data-action': 'ack',
            onclick: (e) => act(e.currentTarget, async () => {
              await api('POST', `/orchestrator/alerts/${encodeURIComponent(alert.id)}/ack`);
              await this.load();
            }),
          }, 'Acknowledge'),
          el('button', {
            type: 'button',
            'data-action': 'silence',
            onclick: (e) => act(e.currentTarget, async () => {
              const matchers = { ...(alert.labels || {}) };
              delete matchers.severity;
              await api('POST', '/orchestrator/silences', {
                matchers,
                duration: '1h',
                comment: 'silenced from the console',
              });
              await this.load();
            }),
          }, 'Silence 1 h'))));
      $('#alerts-active tbody').replaceChildren(...(active.length ? active
        : [el('tr', {}, el('td', { colspan: 7 }, 'No alert is active.'))]));
      const recent = (body.recent || []).map((alert) => el('tr', { 'data-alert': alert.id },
        el('td', {}, alert.rule),
        el('td', {}, statusBadge(alert.severity)),
        el('td', {}, statusBadge(alert.phase)),
        el('td', { class: 'id' }, labels(alert)),
        el('td', {}, when(alert.resolved_at))));
      $('#alerts-recent tbody').replaceChildren(...(recent.length ? recent
        : [el('tr', {}, el('td', { colspan: 5 }, 'Nothing recent.'))]));
      const rows = (silences.silences || []).map((silence) => el('tr', { 'data-silence': silence.id },
        el('td', { class: 'id' }, Object.entries(silence.matchers || {}).map(([k, v]) => `${k}=${v}`).join(', ')),
        el('td', {}, when(silence.ends_at)),
        el('td', {}, silence.created_by || ''),
        el('td', {}, silence.active ? 'active' : 'expired'),
        el('td', {}, silence.active ? el('button', {
          type: 'button',
          onclick: (e) => act(e.currentTarget, async () => {
            await api('DELETE', `/orchestrator/silences/${encodeURIComponent(silence.id)}`);
            await this.load();
          }),
        }, 'Expire') : null)));
      $('#silences tbody').replaceChildren(...(rows.length ? rows
        : [el('tr', {}, el('td', { colspan: 5 }, 'No silence.'))]));
    },
  };

  // ---- Live events ---------------------------------------------------------------------------

  const events = {
    stream: null,
    paused: false,
    /** The highest sequence shown: a line at or below it is never shown twice. */
    shown: 0,
    count: 0,

    enter() {
      if (!this.stream && !this.paused) this.open();
    },

    leave() {},

    path() {
      const form = new FormData($('#events-filter'));
      const query = new URLSearchParams();
      for (const type of String(form.get('type') || '').split(',').map((t) => t.trim()).filter(Boolean)) {
        query.append('type', type);
      }
      const source = String(form.get('source') || '').trim();
      if (source) query.set('source', source);
      const text = query.toString();
      return `/orchestrator/events/stream${text ? `?${text}` : ''}`;
    },

    open(resumeAfter = null) {
      this.stream = new Stream(this.path(), {
        onEvent: (event) => this.line(event),
        onState: (state) => {
          liveLabel('#events-live')(this.paused ? 'paused' : state);
        },
      });
      this.stream.lastId = resumeAfter;
      this.stream.start();
    },

    /** New filters: a fresh tail from now. */
    apply() {
      if (this.stream) this.stream.stop();
      this.shown = 0;
      this.count = 0;
      $('#events-tail').replaceChildren();
      this.paused = false;
      $('#events-pause').textContent = 'Pause';
      this.open();
    },

    /** Pause closes the stream; resume opens it after the last line shown. */
    togglePause() {
      if (!this.paused) {
        this.paused = true;
        if (this.stream) this.stream.stop();
        liveLabel('#events-live')('paused');
        $('#events-pause').textContent = 'Resume';
      } else {
        this.paused = false;
        $('#events-pause').textContent = 'Pause';
        const resumeAfter = this.stream ? this.stream.lastId : null;
        this.open(resumeAfter);
      }
    },

    line(event) {
      const tail = $('#events-tail');
      if (event.type === 'reset') {
        let first = '?';
        try {
          first = JSON.parse(event.data).first_seq;
        } catch {
          // keep '?'
        }
        tail.append(el('li', { class: 'gap' }, `Events before ${first} are no longer kept: some were missed.`));
        return;
      }
      if (event.type !== 'message') return;
      const seq = Number(event.id);
      if (Number.isFinite(seq) && seq <= this.shown) return;
      if (Number.isFinite(seq)) this.shown = seq;
      let stored = {};
      try {
        stored = JSON.parse(event.data);
      } catch {
        stored = {};
      }
      const data = stored.data === undefined ? '' : JSON.stringify(stored.data);
      tail.append(el('li', { 'data-seq': event.id, 'data-event': stored.event_id },
        el('span', { class: 'seq' }, `#${event.id}`),
        el('span', { class: 'type' }, stored.type || ''),
        el('span', {}, `from ${stored.source || '?'} `),
        el('small', { class: 'muted' }, data.length > 200 ? `${data.slice(0, 200)}…` : data)));
      while (tail.children.length > TAIL_LINES) tail.firstElementChild.remove();
      tail.scrollTop = tail.scrollHeight;
      this.count += 1;
      $('#events-count').textContent = `, ${this.count} shown`;
    },
  };

  // ---- Latency -------------------------------------------------------------------------------

  const latency = {
    timer: null,
    /** endpoint → [[time, p95 ms], ...], newest last. */
    series: new Map(),

    async enter() {
      await this.sample();
      this.timer = setInterval(() => this.sample().catch(() => {}), 5000);
    },

    leave() {
      clearInterval(this.timer);
    },

    /** p95 per endpoint from /metrics: the fleet's figures when present, else this replica's. */
    parse(text) {
      const fleet = new Map();
      const replica = new Map();
      const pattern = /^(acc_fleet_latency_seconds|acc_http_window_latency_seconds)\{([^}]*)\}\s+(\S+)/;
      for (const line of text.split('\n')) {
        const match = pattern.exec(line);
        if (!match) continue;
        const labels = Object.fromEntries([...match[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
        if (labels.quantile !== '0.95' || !labels.endpoint) continue;
        const value = Number(match[3]) * 1000;
        if (!Number.isFinite(value)) continue;
        (match[1] === 'acc_fleet_latency_seconds' ? fleet : replica).set(labels.endpoint, value);
      }
      return fleet.size ? { source: 'fleet (every ingress replica merged)', values: fleet }
        : { source: 'this replica', values: replica };
    },

    async sample() {
      let response;
      try {
        response = await fetch('/metrics', { cache: 'no-store' });
      } catch (err) {
        $('#latency-source').textContent = `Cannot read /metrics: ${err.message}`;
        return;
      }
      const { source, values } = this.parse(await response.text());
      const now = Date.now();
      for (const [endpoint, value] of values) {
        if (!this.series.has(endpoint)) this.series.set(endpoint, []);
        const points = this.series.get(endpoint);
        points.push([now, value]);
        while (points.length > LATENCY_POINTS) points.shift();
      }
      $('#latency-source').textContent = `Sampled every 5 s from /metrics, ${source}; the last ${LATENCY_POINTS * 5 / 60} minutes.`;
      this.render();
    },

    render() {
      const svgNs = 'http://www.w3.org/2000/svg';
      const svg = (tag, attributes) => {
        const node = document.createElementNS(svgNs, tag);
        for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
        return node;
      };
      const width = 800;
      const height = 300;
      const pad = { left: 48, right: 12, top: 12, bottom: 28 };
      const endpoints = [...this.series.keys()].sort();
      const all = endpoints.flatMap((e) => this.series.get(e));
      const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'p95 latency per endpoint' });
      if (!all.length) {
        $('#latency-chart').replaceChildren(el('p', { class: 'muted' }, 'No latency figures yet: they appear once requests arrive.'));
        $('#latency-table tbody').replaceChildren();
        return;
      }
      const t0 = Math.min(...all.map((p) => p[0]));
      const t1 = Math.max(t0 + 60000, ...all.map((p) => p[0]));
      const top = Math.max(1, ...all.map((p) => p[1])) * 1.1;
      const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
      const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
      chart.append(svg('line', { x1: pad.left, y1: y(0), x2: width - pad.right, y2: y(0), stroke: '#d0d7de' }));
      for (const fraction of [0.5, 1]) {
        const value = (top / 1.1) * fraction;
        chart.append(svg('line', { x1: pad.left, y1: y(value), x2: width - pad.right, y2: y(value), stroke: '#eaeef2' }));
        const label = svg('text', { x: 4, y: y(value) + 4 });
        label.textContent = `${value.toFixed(value < 10 ? 1 : 0)} ms`;
        chart.append(label);
      }
      const axis = svg('text', { x: pad.left, y: height - 8 });
      axis.textContent = `${Math.round((t1 - t0) / 1000)} s shown, newest on the right`;
      chart.append(axis);
      const rows = [];
      endpoints.forEach((endpoint, i) => {
        const points = this.series.get(endpoint);
        const style = { stroke: COLOURS[i % COLOURS.length], dash: DASHES[i % DASHES.length] };
        chart.append(svg('polyline', {
          points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' '),
          fill: 'none',
          stroke: style.stroke,
          'stroke-width': 2,
          'stroke-dasharray': style.dash || 'none',
          'data-endpoint': endpoint,
        }));
        const [lastT, lastV] = points[points.length - 1];
        // The newest figure as a dot, so a series of one sample is visible too.
        chart.append(svg('circle', { cx: x(lastT).toFixed(1), cy: y(lastV).toFixed(1), r: 3, fill: style.stroke, 'data-endpoint': endpoint }));
        const tag = svg('text', { x: Math.min(x(lastT) + 4, width - 90), y: y(lastV) - 4 });
        tag.textContent = endpoint;
        chart.append(tag);
        const swatch = svg('svg', { viewBox: '0 0 40 6', width: 40, height: 6 });
        swatch.append(svg('line', { x1: 0, y1: 3, x2: 40, y2: 3, stroke: style.stroke, 'stroke-width': 3, 'stroke-dasharray': style.dash || 'none' }));
        rows.push(el('tr', { 'data-endpoint': endpoint },
          el('td', {}, endpoint),
          el('td', {}, swatch),
          el('td', {}, lastV.toFixed(2)),
          el('td', {}, Math.max(...points.map((p) => p[1])).toFixed(2))));
      });
      $('#latency-chart').replaceChildren(chart);
      $('#latency-table tbody').replaceChildren(...rows);
    },
  };

  // ---- Views and sign-in ---------------------------------------------------------------------

  const VIEWS = { agents, tasks, alerts, events, latency };

  async function show(name) {
    if (!VIEWS[name]) name = 'agents';
    if (current && current !== name) VIEWS[current].leave();
    current = name;
    for (const section of document.querySelectorAll('.view')) section.hidden = section.id !== name;
    for (const link of document.querySelectorAll('#nav a')) {
      if (link.dataset.view === name) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    try {
      await VIEWS[name].enter();
    } catch (err) {
      notice(err instanceof ApiError ? explain(err) : String(err));
    }
  }

  function signedIn() {
    $('#sign-in').hidden = true;
    $('#nav').hidden = false;
    $('#sign-out').hidden = false;
    show(location.hash.slice(1));
  }

  /** Back to the sign-in form, forgetting the token; `why` is shown when given. */
  function signOut(why) {
    for (const view of Object.values(VIEWS)) {
      try {
        view.leave();
      } catch {
        // a view that never started has nothing to stop
      }
    }
    events.stream = null;
    agents.stream = null;
    alerts.stream = null;
    current = null;
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    for (const section of document.querySelectorAll('.view')) section.hidden = section.id !== 'sign-in';
    $('#nav').hidden = true;
    $('#sign-out').hidden = true;
    notice('');
    const error = $('#sign-in-error');
    error.textContent = why || '';
    error.hidden = !why;
  }

  async function signIn(candidate) {
    token = candidate;
    try {
      // Reading the agents list needs the admin scope: the same check every view makes.
      await api('GET', '/orchestrator/agents');
    } catch (err) {
      if (token) signOut(explain(err));
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $('#token').value = '';
    $('#sign-in-error').hidden = true;
    signedIn();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('#sign-in-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const value = $('#token').value.trim().replace(/^Bearer\s+/i, '');
      if (!value) {
        signOut('Paste an admin token to sign in.');
        return;
      }
      signIn(value);
    });
    $('#sign-out').addEventListener('click', () => signOut('Signed out.'));
    $('#task-filter').addEventListener('submit', (e) => {
      e.preventDefault();
      const form = new FormData(e.currentTarget);
      tasks.filter = new URLSearchParams();
      for (const key of ['status', 'capability', 'tenant']) {
        const value = String(form.get(key) || '').trim();
        if (value) tasks.filter.set(key, value);
      }
      tasks.list().catch((err) => notice(explain(err)));
    });
    $('#tasks-refresh').addEventListener('click', (e) => act(e.currentTarget, () => tasks.refresh()));
    $('#events-filter').addEventListener('submit', (e) => {
      e.preventDefault();
      events.apply();
    });
    $('#events-pause').addEventListener('click', () => events.togglePause());
    window.addEventListener('hashchange', () => {
      if (token && current) show(location.hash.slice(1));
    });
    if (token) signIn(token);
    else signOut();
  });
})();
