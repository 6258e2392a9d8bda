// End-to-end test of the operator console in headless Chromium, against a real bridge that
// tests/api/console.rs starts (it passes the address and the tokens in the environment).
//
// Each step is a sentence an operator would say; the first failed expectation ends the run
// with a non-zero exit and the step's name. Screenshots of every view go to SCREENSHOT_DIR.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/api/console.rs sets it)`);
  return value;
};
const BASE = env('BASE_URL');
const ADMIN = env('ADMIN_TOKEN');
const AGENT = env('AGENT_ID');
const AGENT_TOKEN = env('AGENT_TOKEN');
const EXPIRED = env('EXPIRED_TOKEN');
const SHOTS = env('SCREENSHOT_DIR');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = 20000;

mkdirSync(SHOTS, { recursive: true });

let step = 'starting';
const log = (text) => console.log(`[console e2e] ${text}`);
function expect(condition, what) {
  if (!condition) throw new Error(`expected ${what}`);
}

/** The bridge's API, as a client or an agent would call it. */
async function call(method, path, token, body) {
  const response = await fetch(`${BASE}${path}`, {
    method,
    headers: {
      Authorization: `Bearer ${token}`,
      ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  return { status: response.status, data };
}

async function must(method, path, token, body, want = [200, 202]) {
  const answer = await call(method, path, token, body);
  if (!want.includes(answer.status)) {
    throw new Error(`${method} ${path} answered ${answer.status} ${JSON.stringify(answer.data)}`);
  }
  return answer.data;
}

const heartbeat = () => must('POST', '/orchestrator/heartbeat', AGENT_TOKEN, { agent_id: AGENT });

async function waitFor(what, check, within = WAIT) {
  const deadline = Date.now() + within;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Claims one task as the agent and reports `report` for it. */
async function claimAndReport(taskId, report) {
  const claimed = await must('POST', '/orchestrator/tasks/claim', AGENT_TOKEN, { max: 1, wait: '5s' });
  expect(claimed.tasks.length === 1 && claimed.tasks[0].task_id === taskId,
    `the agent to claim ${taskId}, got ${JSON.stringify(claimed.tasks)}`);
  await must('POST', `/orchestrator/tasks/${taskId}/callback`, AGENT_TOKEN, { status: 'running' });
  await must('POST', `/orchestrator/tasks/${taskId}/callback`, AGENT_TOKEN, report);
}

async function audited(action, target) {
  return waitFor(`the audit trail to record ${action} of ${target}`, async () => {
    const { data } = await call('GET', `/orchestrator/audit?kind=admin&action=${action}`, ADMIN);
    return data && data.records.some((r) => r.target === target && r.actor === 'operator');
  });
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const problems = [];
let page = null;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error' && !/Failed to load resource/.test(message.text())) {
      problems.push(`console error: ${message.text()}`);
    }
  });
  const shot = async (name) => {
    await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
  };
  const view = async (name) => {
    await page.click(`#nav a[data-view="${name}"]`);
    await page.waitForSelector(`#${name}:not([hidden])`);
  };

  step = 'the agent registers';
  await must('POST', '/orchestrator/register', AGENT_TOKEN, {
    agent_id: AGENT,
    name: 'Console test agent',
    base_url: 'http://127.0.0.1:9',
    capabilities: ['resize'],
  });

  step = 'a wrong token is refused with a clear message';
  await page.goto(`${BASE}/console`);
  await page.fill('#token', 'not-a-token');
  await page.click('#sign-in-form button[type=submit]');
  await page.waitForSelector('#sign-in-error:not([hidden])');
  const wrong = await page.textContent('#sign-in-error');
  expect(/refused/.test(wrong) && /INVALID_TOKEN/.test(wrong), `a refusal naming INVALID_TOKEN, got "${wrong}"`);
  expect(await page.isHidden('#nav'), 'no console behind a refused token');
  await shot('sign-in-refused');

  step = 'an expired token is refused with a clear message';
  await page.fill('#token', EXPIRED);
  await page.click('#sign-in-form button[type=submit]');
  await page.waitForFunction(() => /expired/.test(document.querySelector('#sign-in-error').textContent));

  step = 'an agent token (no admin scope) is refused with a clear message';
  await page.fill('#token', AGENT_TOKEN);
  await page.click('#sign-in-form button[type=submit]');
  await page.waitForFunction(() => /INSUFFICIENT_SCOPE/.test(document.querySelector('#sign-in-error').textContent));

  step = 'the operator signs in and sees the agent online';
  await heartbeat();
  await page.fill('#token', ADMIN);
  await page.click('#sign-in-form button[type=submit]');
  await page.waitForSelector('#agents:not([hidden])');
  const row = `#agents-table tr[data-agent="${AGENT}"]`;
  await page.waitForSelector(`${row} td[data-status="online"]`, { timeout: WAIT });
  expect((await page.textContent(row)).includes('resize'), 'the capabilities in the row');
  const stored = await page.evaluate(() => ({
    session: sessionStorage.getItem('acc.console.token'),
    local: Object.keys(localStorage).length,
    cookie: document.cookie,
    url: location.href,
  }));
  expect(stored.session === ADMIN, 'the token in session storage');
  expect(stored.local === 0 && stored.cookie === '' && !stored.url.includes(ADMIN),
    'the token nowhere but session storage');
  await page.waitForSelector('#agents-live:text("live: live")');
  await shot('agents');

  step = 'the silent agent turns offline, live';
  await page.waitForSelector(`${row} td[data-status="offline"]`, { timeout: WAIT });
  expect((await page.textContent(`${row} td[data-status]`)).includes('offline'), 'the status written out');

  step = 'the AgentOffline alert fires and the operator acknowledges it';
  await view('alerts');
  const alertRow = `#alerts-active tr:has(td:text("agent_id=${AGENT}"))`;
  await page.waitForSelector(`${alertRow} button[data-action="ack"]`, { timeout: WAIT });
  await shot('alerts');
  await page.click(`${alertRow} button[data-action="ack"]`);
  await page.waitForSelector(`${alertRow} td[data-acknowledged="yes"]`, { timeout: WAIT });
  const alertId = await page.getAttribute(alertRow, 'data-alert');
  await audited('alert.ack', alertId);

  step = 'the agent heartbeats and turns online again, live';
  await view('agents');
  await heartbeat();
  await page.waitForSelector(`${row} td[data-status="online"]`, { timeout: WAIT });

  step = 'a task submitted through the API is seen to succeed';
  const ok = `console-ok-${Date.now()}`;
  await must('POST', '/orchestrator/tasks', ADMIN, { task_id: ok, capability: 'resize', input: { w: 64 } });
  await view('tasks');
  await page.waitForSelector(`#tasks-table tr[data-task="${ok}"] td[data-status="queued"]`, { timeout: WAIT });
  await claimAndReport(ok, { status: 'succeeded', result: { url: 'done.png' } });
  await page.waitForSelector(`#tasks-table tr[data-task="${ok}"] td[data-status="succeeded"]`, { timeout: WAIT });
  await page.click(`#tasks-table tr[data-task="${ok}"] button:text("Details")`);
  await page.waitForSelector('#task-detail:not([hidden]) pre');
  const detail = await page.textContent('#task-detail');
  expect(detail.includes(AGENT) && detail.includes('done.png'), 'the attempt and the result in the detail');
  await shot('tasks');

  step = 'a dead-lettered task is replayed from the page';
  const dead = `console-dead-${Date.now()}`;
  await must('POST', '/orchestrator/tasks', ADMIN, { task_id: dead, capability: 'resize', max_attempts: 1 });
  await heartbeat();
  await claimAndReport(dead, { status: 'failed', error: { message: 'corrupt input', retryable: false } });
  const dlqRow = `#dlq-table tr[data-task="${dead}"]`;
  await page.waitForSelector(`${dlqRow} button[data-action="replay"]`, { timeout: WAIT });
  expect((await page.textContent(dlqRow)).includes('1'), 'the attempt count in the DLQ row');
  await page.click(`${dlqRow} button[data-action="replay"]`);
  await waitFor('the replayed task to be queued', async () => {
    const { data } = await call('GET', `/orchestrator/tasks/${dead}`, ADMIN);
    return data && data.status === 'queued';
  });
  await page.waitForSelector(dlqRow, { state: 'detached', timeout: WAIT });
  await audited('dlq.replay', dead);

  step = 'a queued task is cancelled from the page';
  await page.click(`#tasks-table tr[data-task="${dead}"] button[data-action="cancel"]`);
  await waitFor('the task to be cancelled', async () => {
    const { data } = await call('GET', `/orchestrator/tasks/${dead}`, ADMIN);
    return data && data.status === 'cancelled';
  });
  await page.waitForSelector(`#tasks-table tr[data-task="${dead}"] td[data-status="cancelled"]`, { timeout: WAIT });
  await audited('task.cancel', dead);

  step = 'a live event appears in the tail';
  await view('events');
  await page.waitForSelector('#events-live:text("live: live")', { timeout: WAIT });
  const emit = (id, type) => must('POST', '/orchestrator/events', AGENT_TOKEN, {
    event_id: id,
    type,
    source: AGENT,
    data: { n: id },
    time: new Date().toISOString(),
  });
  const stamp = Date.now();
  const ids = [1, 2, 3, 4, 5].map((n) => `console-ev-${stamp}-${n}`);
  await emit(ids[0], 'demo.one');
  await page.waitForSelector(`#events-tail li[data-event="${ids[0]}"]`, { timeout: WAIT });

  step = 'the tail resumes after a disconnect without losing or repeating a line';
  await page.click('#events-pause');
  await page.waitForSelector('#events-live:text("live: paused")');
  await emit(ids[1], 'demo.one');
  await emit(ids[2], 'demo.two');
  await page.click('#events-pause');
  await page.waitForSelector(`#events-tail li[data-event="${ids[2]}"]`, { timeout: WAIT });
  await emit(ids[3], 'demo.one');
  await page.waitForSelector(`#events-tail li[data-event="${ids[3]}"]`, { timeout: WAIT });
  const order = await page.$$eval('#events-tail li[data-event]', (lines) => lines.map((l) => l.dataset.event));
  const ours = order.filter((id) => id.startsWith(`console-ev-${stamp}`));
  expect(JSON.stringify(ours) === JSON.stringify(ids.slice(0, 4)),
    `each event once and in order, got ${JSON.stringify(ours)}`);

  step = 'the type filter keeps only matching events';
  await page.fill('#events-filter input[name="type"]', '*.two');
  await page.click('#events-filter button[type=submit]');
  await page.waitForSelector('#events-live:text("live: live")', { timeout: WAIT });
  await emit(`${ids[4]}-one`, 'demo.one');
  await emit(ids[4], 'demo.two');
  await page.waitForSelector(`#events-tail li[data-event="${ids[4]}"]`, { timeout: WAIT });
  expect(await page.$(`#events-tail li[data-event="${ids[4]}-one"]`) === null, 'demo.one filtered out');
  await shot('events');

  step = 'the latency chart shows p95 per endpoint';
  await view('latency');
  await page.waitForSelector('#latency-chart svg circle', { timeout: WAIT });
  // A second sample (every 5 s) draws the lines.
  await page.waitForFunction(() => [...document.querySelectorAll('#latency-chart polyline')]
    .some((line) => line.getAttribute('points').split(' ').length > 1), null, { timeout: WAIT });
  await page.waitForSelector('#latency-table tr[data-endpoint]');
  await shot('latency');

  step = 'every view fits a 390 px wide screen';
  await page.setViewportSize({ width: 390, height: 844 });
  for (const name of ['agents', 'tasks', 'alerts', 'events', 'latency']) {
    await view(name);
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    expect(width <= 392, `${name} within 390 px, it is ${width} px wide`);
    await shot(`${name}-390`);
  }

  step = 'a token that expires during a session brings back the sign-in form with a message';
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.evaluate((expired) => sessionStorage.setItem('acc.console.token', expired), EXPIRED);
  await page.reload();
  await page.waitForFunction(() => /expired/.test(document.querySelector('#sign-in-error').textContent));
  expect(await page.isVisible('#sign-in'), 'the sign-in form, not a blank page');
  expect(await page.evaluate(() => sessionStorage.getItem('acc.console.token')) === null,
    'the refused token forgotten');

  step = 'nothing was refused by the content security policy and no script failed';
  expect(problems.length === 0, `no problems, got ${JSON.stringify(problems)}`);
  log('all steps passed');
} catch (err) {
  console.error(`[console e2e] FAILED at "${step}": ${err.message}`);
  if (page) {
    await page.screenshot({ path: join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
    const notice = await page.textContent('#notice').catch(() => '');
    if (notice) console.error(`[console e2e] the page's notice: ${notice}`);
  }
  if (problems.length) console.error(`[console e2e] page problems: ${JSON.stringify(problems)}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
