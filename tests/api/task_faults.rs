//! Task fault tests (issue 12, DESIGN.md §6.1): thousands of tasks in flight with pull agents
//! claiming, failing some retryably and completing the rest, while the bridge is `kill -9`'d,
//! nats-server is `kill -9`'d (`fsync` durability), or the replica holding the dispatcher lease is
//! `SIGKILL`ed. Real nats-server, real bridge processes, real HTTP.
//!
//! What must hold after every fault, checked from three sides:
//! - **the agents** (what each was told): every claimed attempt (task, attempt number) was handed
//!   to one agent only; at most one agent got a 200 for a task's result; an acknowledged result or
//!   non-retryable failure is what the task ended with; repeating an acknowledged result is
//!   answered `duplicate: true`, never stored again;
//! - **every revision of every record** (a watch of the tasks bucket from before the first
//!   submission): once a record is terminal it is never written again;
//! - **the final records**: every task that got a 202 is terminal (`succeeded` or
//!   `dead_lettered`); its attempts are numbered 1, 2, … without a gap or a repeat, each ended
//!   before the next started (never two live attempts), each held by the agent that claimed it;
//!   exactly one attempt succeeded when the task did, none when it was dead-lettered.
//!
//! Each test prints its figures (`--no-capture`); docs/RELIABILITY.md records them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Operation;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::faults::{exited, signal, spawn_bridge_with};
use crate::helpers::*;
use crate::tasks::scoped_token;

/// The capability every task of these tests asks for.
const CAPABILITY: &str = "fault-work";
/// Tasks each agent may hold at once (`max_concurrent_tasks`), and claims at most at a time.
const SLOTS: u32 = 5;
/// One attempt's lease: a task whose claim answer was lost with a killed process comes back
/// after this long.
const TASK_TIMEOUT: &str = "2s";
/// The longest a whole run (submissions, fault, every task finished) may take.
const RUN_BOUND: Duration = Duration::from_secs(120);

/// The size of a run.
#[derive(Clone, Copy)]
struct Load {
    tasks: usize,
    agents: usize,
}

/// What the submitter and the agents were told, by task id.
#[derive(Default)]
struct Seen {
    /// Attempts handed out by claims: (attempt, agent).
    claims: HashMap<String, Vec<(u32, String)>>,
    /// Results acknowledged (200) to an agent: (agent, attempt). At most one per task.
    results: HashMap<String, Vec<(String, u32)>>,
    /// Tasks an agent failed with `retryable: false` and got a 200 for.
    fatal: HashSet<String>,
    /// Retryable failures acknowledged.
    retried: usize,
    /// Callbacks refused 409 `STALE_ATTEMPT` (the lease had expired meanwhile).
    stale: usize,
    /// Repeats of an acknowledged result, each answered `duplicate: true`.
    repeats: usize,
    /// Callbacks whose first answer was lost (no answer, or 503) and whose retry was answered
    /// `duplicate: true`: stored once, not twice.
    retried_duplicates: usize,
    /// Claim and callback requests that got no answer or a 503 (and were tried again).
    unanswered: usize,
    /// Anything an agent was told that breaks the rules, with what it was.
    violations: Vec<String>,
}

/// The HTTP doors of the bridge replicas; a request that gets no answer is tried on the next.
#[derive(Clone)]
struct Doors {
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
}

impl Doors {
    fn new(ports: &[u16]) -> Self {
        Self {
            http: reqwest::Client::new(),
            bases: Arc::new(
                ports
                    .iter()
                    .map(|port| format!("http://127.0.0.1:{port}"))
                    .collect(),
            ),
        }
    }

    /// One POST to the door `turn` picks; `None` when no answer came (refused, reset, timed out).
    async fn post(
        &self,
        turn: usize,
        path: &str,
        token: &str,
        body: &Value,
    ) -> Option<(u16, Value)> {
        let base = &self.bases[turn % self.bases.len()];
        let response = self
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .json(body)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let body = response.json().await.ok()?;
        Some((status, body))
    }

    /// POSTs until an answer other than a 503 comes (a client retrying through an outage),
    /// moving to the next door after each miss. `None` once `stop` is cancelled.
    async fn post_until_answered(
        &self,
        turn: &mut usize,
        path: &str,
        token: &str,
        body: &Value,
        misses: &mut usize,
        stop: &CancellationToken,
    ) -> Option<(u16, Value)> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.post(*turn, path, token, body).await {
                Some((status, body)) if status != 503 && status != 429 => {
                    return Some((status, body));
                }
                _ => {
                    *misses += 1;
                    *turn += 1;
                    // A client's pause before trying again; nothing to wait for but time.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn get(&self, turn: usize, path: &str, token: &str) -> Option<(u16, Value)> {
        let base = &self.bases[turn % self.bases.len()];
        let response = self
            .http
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.ok()?))
    }

    /// Waits until a door answers `/health/ready` with 200.
    async fn ready(&self, turn: usize) {
        eventually(Duration::from_secs(30), "the bridge ready", || async {
            let base = &self.bases[turn % self.bases.len()];
            let ready = self.http.get(format!("{base}/health/ready")).send().await;
            ready.is_ok_and(|r| r.status() == 200).then_some(())
        })
        .await;
    }
}

fn agent_name(i: usize) -> String {
    format!("fault-agent-{i:02}")
}

fn task_id(n: usize) -> String {
    format!("tf-{n:05}")
}

fn task_number(task_id: &str) -> usize {
    task_id.trim_start_matches("tf-").parse().unwrap()
}

/// Registers the agents (capability [`CAPABILITY`], [`SLOTS`] slots) and waits until every one
/// is online.
async fn register_agents(doors: &Doors, load: Load) {
    for i in 0..load.agents {
        let agent = agent_name(i);
        let body = json!({
            "agent_id": agent,
            "name": format!("Fault agent {i}"),
            "base_url": format!("https://{agent}.example.com"),
            "capabilities": [CAPABILITY],
            "max_concurrent_tasks": SLOTS,
        });
        let (status, answer) = doors
            .post(i, "/orchestrator/register", &token(&agent), &body)
            .await
            .expect("the bridge answers");
        assert_eq!(status, 200, "{answer}");
    }
    eventually(Duration::from_secs(20), "every agent online", || async {
        let (_, list) = doors.get(0, "/orchestrator/agents", &admin_token()).await?;
        let online = list["agents"]
            .as_array()?
            .iter()
            .filter(|a| a["status"] == "online")
            .count();
        (online >= load.agents).then_some(())
    })
    .await;
}

/// Submits `load.tasks` tasks, 16 at a time, retrying each (same id, same body) until a 202;
/// returns the ids that got one.
async fn submit_all(doors: Doors, load: Load, stop: CancellationToken) -> (Vec<String>, usize) {
    let token = scoped_token("fault-client", "orchestrator.submit");
    let answers: Vec<(String, usize)> = futures::stream::iter(0..load.tasks)
        .map(|n| {
            let (doors, token, stop) = (doors.clone(), token.clone(), stop.clone());
            async move {
                let id = task_id(n);
                let body = json!({
                    "task_id": id,
                    "capability": CAPABILITY,
                    "input": {"n": n},
                    "timeout": TASK_TIMEOUT,
                    "max_attempts": 5,
                    "backoff": {"initial": "50ms", "max": "400ms", "multiplier": 2},
                });
                let (mut turn, mut misses) = (n, 0);
                let (status, answer) = doors
                    .post_until_answered(
                        &mut turn,
                        "/orchestrator/tasks",
                        &token,
                        &body,
                        &mut misses,
                        &stop,
                    )
                    .await
                    .expect("submitted before the end of the run");
                assert_eq!(status, 202, "{id}: {answer}");
                assert_eq!(answer["task_id"], id.as_str(), "{answer}");
                (id, misses)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let retried = answers.iter().filter(|(_, misses)| *misses > 0).count();
    let mut ids: Vec<String> = answers.into_iter().map(|(id, _)| id).collect();
    ids.sort();
    (ids, retried)
}

/// What an agent does with attempt `attempt` of task number `n`: 1 in 50 tasks fail for good
/// (dead-lettered at once), 1 in 10 fail retryably on their first attempt, the rest succeed.
fn report_for(agent: &str, n: usize, attempt: u32) -> Value {
    if n % 50 == 7 {
        json!({"status": "failed", "error": {"message": "bad input", "retryable": false}})
    } else if n % 10 == 3 && attempt == 1 {
        json!({"status": "failed", "error": {"message": "flaky", "retryable": true}})
    } else {
        json!({"status": "succeeded", "result": {"agent": agent, "attempt": attempt, "n": n}})
    }
}

/// A pull agent: claims up to [`SLOTS`] tasks (long-poll), reports `running` for some, then its
/// outcome ([`report_for`]), retrying a report that got no answer; repeats some acknowledged
/// results to check they are answered as duplicates. Counts each stored result on `stored`.
async fn run_agent(
    doors: Doors,
    index: usize,
    seen: Arc<Mutex<Seen>>,
    stored: watch::Sender<usize>,
    stop: CancellationToken,
) {
    let agent = agent_name(index);
    let token = token(&agent);
    let mut turn = index;
    let claim = json!({"max": SLOTS, "wait": "1s"});
    loop {
        let mut misses = 0;
        let answer = doors
            .post_until_answered(
                &mut turn,
                "/orchestrator/tasks/claim",
                &token,
                &claim,
                &mut misses,
                &stop,
            )
            .await;
        seen.lock().unwrap().unanswered += misses;
        let Some((status, answer)) = answer else {
            return;
        };
        if status != 200 {
            seen.lock()
                .unwrap()
                .violations
                .push(format!("{agent}: claim answered {status} {answer}"));
            continue;
        }
        for task in answer["tasks"].as_array().cloned().unwrap_or_default() {
            let id = task["task_id"].as_str().unwrap().to_owned();
            let attempt = task["attempt"].as_u64().unwrap() as u32;
            let n = task_number(&id);
            seen.lock()
                .unwrap()
                .claims
                .entry(id.clone())
                .or_default()
                .push((attempt, agent.clone()));
            let path = format!("/orchestrator/tasks/{id}/callback");
            if n % 5 == 1 {
                let running = json!({"status": "running", "progress": {"done": 0.5}});
                let mut misses = 0;
                let answer = doors
                    .post_until_answered(&mut turn, &path, &token, &running, &mut misses, &stop)
                    .await;
                seen.lock().unwrap().unanswered += misses;
                match answer {
                    None => return,
                    Some((200, _)) => {}
                    Some((409, body)) if body["error"]["code"] == "STALE_ATTEMPT" => {
                        seen.lock().unwrap().stale += 1;
                        continue;
                    }
                    Some((status, body)) => {
                        seen.lock()
                            .unwrap()
                            .violations
                            .push(format!("{agent} {id} running: {status} {body}"));
                        continue;
                    }
                }
            }
            let report = report_for(&agent, n, attempt);
            let mut misses = 0;
            let Some((status, body)) = doors
                .post_until_answered(&mut turn, &path, &token, &report, &mut misses, &stop)
                .await
            else {
                return;
            };
            let repeat = {
                let mut seen = seen.lock().unwrap();
                seen.unanswered += misses;
                note_report(
                    &mut seen, &agent, &id, attempt, &report, status, &body, misses,
                )
            };
            if repeat {
                stored.send_modify(|count| *count += 1);
                if n % 10 == 9 {
                    repeat_result(&doors, &mut turn, &agent, &id, &report, &seen, &stop).await;
                }
            }
        }
    }
}

/// Records what a report of `attempt` was answered; true when it was a result, acknowledged.
#[allow(clippy::too_many_arguments)]
fn note_report(
    seen: &mut Seen,
    agent: &str,
    id: &str,
    attempt: u32,
    report: &Value,
    status: u16,
    body: &Value,
    misses: usize,
) -> bool {
    match status {
        200 => {
            let duplicate = body["duplicate"] == true;
            if duplicate && misses == 0 {
                seen.violations
                    .push(format!("{agent} {id}: a first report answered duplicate"));
            }
            seen.retried_duplicates += usize::from(duplicate);
            if report["status"] == "succeeded" {
                seen.results
                    .entry(id.to_owned())
                    .or_default()
                    .push((agent.to_owned(), attempt));
                return true;
            }
            if report["error"]["retryable"] == false {
                seen.fatal.insert(id.to_owned());
            } else {
                seen.retried += 1;
            }
        }
        409 if body["error"]["code"] == "STALE_ATTEMPT" => seen.stale += 1,
        _ => seen
            .violations
            .push(format!("{agent} {id} report: {status} {body}")),
    }
    false
}

/// Sends an acknowledged result again: it must be answered `duplicate: true`.
async fn repeat_result(
    doors: &Doors,
    turn: &mut usize,
    agent: &str,
    id: &str,
    report: &Value,
    seen: &Mutex<Seen>,
    stop: &CancellationToken,
) {
    let path = format!("/orchestrator/tasks/{id}/callback");
    let mut misses = 0;
    let answer = doors
        .post_until_answered(turn, &path, &token(agent), report, &mut misses, stop)
        .await;
    let mut seen = seen.lock().unwrap();
    seen.unanswered += misses;
    match answer {
        None => {}
        Some((200, body)) if body["duplicate"] == true => seen.repeats += 1,
        Some((status, body)) => seen.violations.push(format!(
            "{agent} {id}: a repeated result answered {status} {body}"
        )),
    }
}

/// Every revision of every task record, as a watch of the bucket saw them (from before the
/// first submission), and how many tasks are terminal now.
#[derive(Default)]
struct Revisions {
    /// Per task: (revision, status) in the order written.
    statuses: HashMap<String, Vec<(u64, String)>>,
    /// Records written to a task after it was terminal (must stay empty).
    after_terminal: Vec<String>,
}

/// Watches the tasks bucket until `stop`, recording every revision; `terminal` counts the
/// tasks whose latest revision is terminal. The watch resumes after its last revision when the
/// server goes away and comes back.
async fn watch_records(
    js: async_nats::jetstream::Context,
    revisions: Arc<Mutex<Revisions>>,
    terminal: watch::Sender<usize>,
    stop: CancellationToken,
) {
    let mut last = 0u64;
    let mut done: HashSet<String> = HashSet::new();
    while !stop.is_cancelled() {
        let Ok(kv) = js
            .get_key_value(auto_com_center::bus::subjects::TASKS_BUCKET)
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let watching = if last == 0 {
            kv.watch_with_history("*").await
        } else {
            kv.watch_all_from_revision(last + 1).await
        };
        let Ok(mut entries) = watching else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let entry = tokio::select! {
                () = stop.cancelled() => return,
                entry = entries.next() => entry,
            };
            let Some(Ok(entry)) = entry else {
                break;
            };
            last = last.max(entry.revision);
            if entry.key.contains('.') || entry.operation != Operation::Put {
                continue;
            }
            let record: Value = serde_json::from_slice(&entry.value).unwrap();
            let status = record["status"].as_str().unwrap().to_owned();
            let mut revisions = revisions.lock().unwrap();
            let history = revisions.statuses.entry(entry.key.clone()).or_default();
            if history
                .iter()
                .any(|(revision, _)| *revision == entry.revision)
            {
                continue;
            }
            let was_terminal = history.last().is_some_and(|(_, s)| terminal_status(s));
            history.push((entry.revision, status.clone()));
            if was_terminal {
                revisions.after_terminal.push(format!(
                    "{} rewritten as {status} at {}",
                    entry.key, entry.revision
                ));
            }
            if terminal_status(&status) && done.insert(entry.key.clone()) {
                terminal.send_modify(|n| *n += 1);
            }
        }
    }
}

fn terminal_status(status: &str) -> bool {
    matches!(status, "succeeded" | "dead_lettered" | "cancelled")
}

/// The latest record of every task, read in one pass over the bucket's stream.
async fn final_records(js: &async_nats::jetstream::Context) -> HashMap<String, Value> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let stream = js
        .get_stream(auto_com_center::bus::subjects::TASKS_BUCKET_STREAM)
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: auto_com_center::bus::subjects::TASK_RECORDS.to_owned(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = HashMap::new();
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < pending {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("records arrive")
            .unwrap()
            .unwrap();
        let record: Value = serde_json::from_slice(&message.payload).unwrap();
        out.insert(record["task_id"].as_str().unwrap().to_owned(), record);
    }
    out
}

/// The figures of one run, printed and recorded in docs/RELIABILITY.md.
#[derive(Debug, Default)]
struct Figures {
    tasks: usize,
    /// From the first submission to the last task terminal.
    elapsed: Duration,
    succeeded: usize,
    dead_lettered: usize,
    attempts: usize,
    outcomes: BTreeMap<String, usize>,
    submissions_retried: usize,
    stale: usize,
    repeats: usize,
    retried_duplicates: usize,
    unanswered: usize,
    revisions_seen: usize,
}

impl Figures {
    fn print(&self, fault: &str) {
        println!(
            "TASK FAULT {fault}: {} tasks in {:.1} s, {} succeeded, {} dead-lettered; {} \
             attempts {:?}; {} callbacks refused STALE_ATTEMPT (lease expired meanwhile); {} \
             repeated results each answered duplicate, {} retried callbacks answered duplicate; \
             {} requests unanswered or 503 (retried); {} submissions retried; {} record \
             revisions watched, none after a terminal one",
            self.tasks,
            self.elapsed.as_secs_f64(),
            self.succeeded,
            self.dead_lettered,
            self.attempts,
            self.outcomes,
            self.stale,
            self.repeats,
            self.retried_duplicates,
            self.unanswered,
            self.submissions_retried,
            self.revisions_seen
        );
    }
}

/// Checks every rule of the module doc; returns the figures.
fn check(
    accepted: &[String],
    records: &HashMap<String, Value>,
    revisions: &Revisions,
    seen: &Seen,
) -> Figures {
    assert!(
        seen.violations.is_empty(),
        "what agents were told: {:#?}",
        seen.violations
    );
    assert!(
        revisions.after_terminal.is_empty(),
        "a terminal record was written again: {:#?}",
        revisions.after_terminal
    );
    let mut figures = Figures {
        tasks: accepted.len(),
        stale: seen.stale,
        repeats: seen.repeats,
        retried_duplicates: seen.retried_duplicates,
        unanswered: seen.unanswered,
        revisions_seen: revisions.statuses.values().map(Vec::len).sum(),
        ..Figures::default()
    };
    for id in accepted {
        let record = records
            .get(id)
            .unwrap_or_else(|| panic!("{id} got a 202 and has no record"));
        let status = record["status"].as_str().unwrap();
        let attempts = record["attempts"].as_array().unwrap();
        figures.attempts += attempts.len();
        // Attempts 1, 2, … in order, each ended before the next began: never two live at once.
        let mut previous_end: Option<chrono::DateTime<chrono::Utc>> = None;
        for (i, attempt) in attempts.iter().enumerate() {
            assert_eq!(attempt["attempt"], i + 1, "{id}: attempt numbers {record}");
            let outcome = attempt["outcome"].as_str().unwrap();
            *figures.outcomes.entry(outcome.to_owned()).or_default() += 1;
            assert_ne!(
                outcome, "running",
                "{id}: a live attempt on a finished task {record}"
            );
            let started: chrono::DateTime<chrono::Utc> =
                serde_json::from_value(attempt["started_at"].clone()).unwrap();
            let ended: chrono::DateTime<chrono::Utc> =
                serde_json::from_value(attempt["ended_at"].clone())
                    .unwrap_or_else(|_| panic!("{id}: attempt {} never ended {record}", i + 1));
            assert!(started <= ended, "{id}: {record}");
            if let Some(previous_end) = previous_end {
                assert!(
                    previous_end <= started,
                    "{id}: attempt {} began before attempt {} ended {record}",
                    i + 1,
                    i
                );
            }
            previous_end = Some(ended);
        }
        let succeeded: Vec<&Value> = attempts
            .iter()
            .filter(|a| a["outcome"] == "succeeded")
            .collect();
        match status {
            "succeeded" => {
                figures.succeeded += 1;
                assert_eq!(succeeded.len(), 1, "{id}: one succeeded attempt {record}");
                assert_eq!(
                    attempts.last().unwrap()["outcome"],
                    "succeeded",
                    "{id}: {record}"
                );
                let winner = succeeded[0];
                assert_eq!(
                    record["result"]["agent"], winner["agent_id"],
                    "{id}: {record}"
                );
                assert_eq!(
                    record["result"]["attempt"], winner["attempt"],
                    "{id}: {record}"
                );
            }
            "dead_lettered" => {
                figures.dead_lettered += 1;
                assert!(succeeded.is_empty(), "{id}: {record}");
                assert!(record["reason"].is_string(), "{id}: {record}");
            }
            other => panic!("{id} ended {other}, not succeeded or dead-lettered: {record}"),
        }
        // What the agents were told agrees with the record.
        let mut handed: HashSet<u32> = HashSet::new();
        for (attempt, agent) in seen.claims.get(id).into_iter().flatten() {
            assert!(
                handed.insert(*attempt),
                "{id}: attempt {attempt} handed out twice: {:?}",
                seen.claims[id]
            );
            let held = &attempts
                .get(*attempt as usize - 1)
                .unwrap_or_else(|| panic!("{id}: claimed attempt {attempt} not in {record}"));
            assert_eq!(held["agent_id"], agent.as_str(), "{id}: {record}");
        }
        let results = seen.results.get(id).map(Vec::as_slice).unwrap_or_default();
        assert!(results.len() <= 1, "{id}: results acknowledged {results:?}");
        if let Some((agent, attempt)) = results.first() {
            assert_eq!(
                status, "succeeded",
                "{id}: an acknowledged result lost {record}"
            );
            assert_eq!(record["result"]["agent"], agent.as_str(), "{id}: {record}");
            assert_eq!(record["result"]["attempt"], *attempt, "{id}: {record}");
        }
        if seen.fatal.contains(id) {
            assert_eq!(status, "dead_lettered", "{id}: {record}");
        }
    }
    figures
}

/// The parts of a run the test drives: the submitter, the agents and the bucket watch.
struct Run {
    seen: Arc<Mutex<Seen>>,
    revisions: Arc<Mutex<Revisions>>,
    stored: watch::Receiver<usize>,
    terminal: watch::Receiver<usize>,
    submitter: tokio::task::JoinHandle<(Vec<String>, usize)>,
    agents: Vec<tokio::task::JoinHandle<()>>,
    watcher: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    started: Instant,
}

impl Run {
    /// Registers the agents, starts watching the bucket, then starts the agents and the
    /// submitter.
    async fn start(doors: &Doors, inspect: &NatsServer, load: Load) -> Self {
        register_agents(doors, load).await;
        let stop = CancellationToken::new();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let revisions = Arc::new(Mutex::new(Revisions::default()));
        let (stored_tx, stored) = watch::channel(0);
        let (terminal_tx, terminal) = watch::channel(0);
        let js = async_nats::jetstream::new(inspect.client().await);
        let watcher = tokio::spawn(watch_records(
            js,
            revisions.clone(),
            terminal_tx,
            stop.clone(),
        ));
        let agents = (0..load.agents)
            .map(|i| {
                tokio::spawn(run_agent(
                    doors.clone(),
                    i,
                    seen.clone(),
                    stored_tx.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let submitter = tokio::spawn(submit_all(doors.clone(), load, stop.clone()));
        Self {
            seen,
            revisions,
            stored,
            terminal,
            submitter,
            agents,
            watcher,
            stop,
            started: Instant::now(),
        }
    }

    /// Waits until agents got `n` results acknowledged.
    async fn results_stored(&mut self, n: usize) {
        tokio::time::timeout(RUN_BOUND, self.stored.wait_for(|count| *count >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} results stored within {RUN_BOUND:?}"))
            .unwrap();
    }

    /// Waits for every submission's 202 and every task's terminal record, stops the agents,
    /// and checks the rules against the final records.
    async fn finish(mut self, js: &async_nats::jetstream::Context) -> Figures {
        let (accepted, submissions_retried) = self.submitter.await.unwrap();
        let want = accepted.len();
        let finished = tokio::time::timeout(
            RUN_BOUND.saturating_sub(self.started.elapsed()),
            self.terminal.wait_for(|n| *n >= want),
        )
        .await
        .is_ok();
        if !finished {
            let terminal = *self.terminal.borrow();
            let records = final_records(js).await;
            let open: Vec<&Value> = records
                .values()
                .filter(|r| !terminal_status(r["status"].as_str().unwrap()))
                .take(5)
                .collect();
            panic!(
                "{terminal} of {want} tasks terminal after {:?}; unfinished, e.g.: {open:#?}",
                self.started.elapsed()
            );
        }
        let elapsed = self.started.elapsed();
        self.stop.cancel();
        for agent in self.agents {
            agent.await.unwrap();
        }
        self.watcher.await.unwrap();
        let records = final_records(js).await;
        let mut figures = check(
            &accepted,
            &records,
            &self.revisions.lock().unwrap(),
            &self.seen.lock().unwrap(),
        );
        figures.submissions_retried = submissions_retried;
        figures.elapsed = elapsed;
        figures
    }
}

/// The roles of a bridge process in these tests: HTTP, the registry (which agents are online)
/// and the dispatcher.
const ROLES: &str = "ingress,registry,dispatcher";

/// Bridge settings of these tests, on top of the usual test ones: no rate or queue cap for the
/// submitter, a short dispatcher lease.
const BRIDGE_ENV: &[(&str, &str)] = &[
    ("RATE_LIMIT_PER_AGENT", "0"),
    ("TASK_MAX_QUEUED_PER_TENANT", "0"),
    ("DISPATCHER_LEASE_TTL", "2s"),
];

/// A bridge process, `SIGKILL`ed when dropped (a failing test leaves nothing running).
struct Bridge {
    child: Child,
    port: u16,
}

impl Bridge {
    fn spawn(nats: &NatsServer, port: u16) -> Self {
        Self {
            child: spawn_bridge_with(&nats.url(), port, ROLES, BRIDGE_ENV),
            port,
        }
    }

    /// `kill -9`, and wait for it to be gone.
    async fn kill(&mut self) {
        signal(&self.child, libc::SIGKILL);
        let _ = exited(&mut self.child, Duration::from_secs(5)).await;
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every holder of the dispatcher lease, in order, with when this test saw it take the lease.
async fn watch_lease(
    js: async_nats::jetstream::Context,
    holders: watch::Sender<Vec<(Instant, String)>>,
    stop: CancellationToken,
) {
    let kv = js
        .get_key_value(auto_com_center::bus::subjects::TASKS_BUCKET)
        .await
        .unwrap();
    let mut entries = kv
        .watch_with_history(auto_com_center::bus::subjects::DISPATCHER_LEASE_KEY)
        .await
        .unwrap();
    loop {
        let entry = tokio::select! {
            () = stop.cancelled() => return,
            entry = entries.next() => entry,
        };
        let Some(Ok(entry)) = entry else {
            return;
        };
        let Ok(lease) = serde_json::from_slice::<auto_com_center::lease::LeaseRecord>(&entry.value)
        else {
            continue;
        };
        holders.send_if_modified(|holders| {
            let new = holders.last().is_none_or(|(_, h)| *h != lease.holder);
            if new {
                holders.push((Instant::now(), lease.holder.clone()));
            }
            new
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_bridge_with_2000_tasks_in_flight_leaves_each_task_one_terminal_state_and_one_live_attempt_at_a_time()
 {
    let load = Load {
        tasks: 2_000,
        agents: 10,
    };
    let nats = NatsServer::start();
    let mut bridge = Bridge::spawn(&nats, free_port());
    let doors = Doors::new(&[bridge.port]);
    doors.ready(0).await;
    let mut run = Run::start(&doors, &nats, load).await;
    run.results_stored(load.tasks / 4).await;
    let killed_at = run.started.elapsed();
    bridge.kill().await;
    let stored_at_kill = *run.stored.borrow();
    let restarted = Bridge::spawn(&nats, bridge.port);
    doors.ready(0).await;
    let back_at = run.started.elapsed();
    let js = async_nats::jetstream::new(nats.client().await);
    let figures = run.finish(&js).await;
    figures.print(&format!(
        "kill -9 of the bridge at {:.1} s ({stored_at_kill} results stored), restarted, ready \
         at {:.1} s",
        killed_at.as_secs_f64(),
        back_at.as_secs_f64()
    ));
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_nats_server_in_fsync_mode_with_2000_tasks_in_flight_leaves_each_task_one_terminal_state_and_one_live_attempt_at_a_time()
 {
    let load = Load {
        tasks: 2_000,
        agents: 10,
    };
    // `DURABILITY=fsync` on an external server: the server fsyncs before it acknowledges.
    let mut nats = NatsServer::start_with_config("jetstream {\n  sync_interval: always\n}\n");
    let bridge = Bridge::spawn(&nats, free_port());
    let doors = Doors::new(&[bridge.port]);
    doors.ready(0).await;
    let mut run = Run::start(&doors, &nats, load).await;
    run.results_stored(load.tasks / 4).await;
    let killed_at = run.started.elapsed();
    nats.kill();
    let stored_at_kill = *run.stored.borrow();
    // The outage: longer than a write's bound (`PUBLISH_TIMEOUT`, 2 s), so writes in flight
    // fail, and every client sees it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.restart();
    let back_at = run.started.elapsed();
    let js = async_nats::jetstream::new(nats.client().await);
    let figures = run.finish(&js).await;
    figures.print(&format!(
        "kill -9 of nats-server (fsync) at {:.1} s ({stored_at_kill} results stored), \
         restarted on the same store at {:.1} s",
        killed_at.as_secs_f64(),
        back_at.as_secs_f64()
    ));
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_replica_holding_the_dispatcher_lease_moves_the_lease_to_the_other_within_its_ttl_and_loses_or_doubles_no_task()
 {
    let load = Load {
        tasks: 2_000,
        agents: 10,
    };
    let ttl = Duration::from_secs(2);
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    let mut first = Bridge::spawn(&nats, free_port());
    let doors_first = Doors::new(&[first.port]);
    doors_first.ready(0).await;
    let (holders_tx, mut holders) = watch::channel(Vec::new());
    let stop_lease = CancellationToken::new();
    let lease_watch = tokio::spawn(watch_lease(js.clone(), holders_tx, stop_lease.clone()));
    // The first replica takes the lease before the second exists: it is the one to kill.
    let first_holder = holders
        .wait_for(|h| !h.is_empty())
        .await
        .unwrap()
        .last()
        .unwrap()
        .1
        .clone();
    let second = Bridge::spawn(&nats, free_port());
    let doors = Doors::new(&[first.port, second.port]);
    doors.ready(1).await;
    let mut run = Run::start(&doors, &nats, load).await;
    run.results_stored(load.tasks / 4).await;
    let killed = Instant::now();
    let killed_at = run.started.elapsed();
    first.kill().await;
    let moved = tokio::time::timeout(
        Duration::from_secs(30),
        holders.wait_for(|h| h.last().is_some_and(|(_, holder)| *holder != first_holder)),
    )
    .await
    .expect("the lease moves")
    .unwrap()
    .last()
    .unwrap()
    .0;
    let took_over = moved - killed;
    let stored_at_move = *run.stored.borrow();
    run.results_stored(stored_at_move + 1).await;
    let resumed = killed.elapsed();
    let figures = run.finish(&js).await;
    stop_lease.cancel();
    lease_watch.await.unwrap();
    let holders = holders.borrow().clone();
    figures.print(&format!(
        "SIGKILL of the replica holding the dispatcher lease at {:.1} s: the lease moved \
         {:.2} s after the kill (TTL {ttl:?}), {} holder(s) after the first, first result \
         stored {:.2} s after the kill",
        killed_at.as_secs_f64(),
        took_over.as_secs_f64(),
        holders.len() - 1,
        resumed.as_secs_f64()
    ));
    assert_eq!(holders.len(), 2, "the lease moved once: {holders:?}");
    // The killed replica's lease runs out at most a TTL after the kill (it renewed before);
    // the standby tries for it just after that expiry, and this test's view of the bucket lags
    // a little.
    assert!(
        took_over <= ttl + Duration::from_millis(500),
        "took over after {took_over:?}"
    );
    drop(second);
}
