//! Task order (DESIGN.md §6.1 "Order"): strict priority, aging, round-robin across tenants, the
//! per-tenant cap on queued tasks, and the same order after a dispatcher restart or failover — over real
//! HTTP, against a real nats-server.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::tasks::{claim, claim_until, register_worker, scoped_token};

async fn submit(app: &TestApp, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/orchestrator/tasks"))
        .bearer_auth(scoped_token("client-1", "orchestrator.submit"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn submit_ok(app: &TestApp, body: Value) -> String {
    let (status, answer) = read(submit(app, body).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["task_id"].as_str().unwrap().to_owned()
}

/// Waits until the dispatcher has taken `task_id` in (its record is in `acc_tasks`): the
/// submissions before it, delivered in order, are then in the queue too.
async fn taken_in(app: &TestApp, task_id: &str) {
    let kv = app.js.get_key_value("acc_tasks").await.unwrap();
    eventually(Duration::from_secs(20), "the task taken in", || async {
        kv.get(task_id).await.ok().flatten().map(|_| ())
    })
    .await;
}

fn ids(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_priority_1_task_submitted_behind_50_priority_5_tasks_is_claimed_first() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "worker-1", &["c"], 1).await;
    for n in 0..50 {
        submit_ok(
            &app,
            json!({"task_id": format!("bulk-{n}"), "capability": "c", "priority": 5}),
        )
        .await;
    }
    submit_ok(
        &app,
        json!({"task_id": "urgent", "capability": "c", "priority": 1}),
    )
    .await;
    taken_in(&app, "urgent").await;
    let tasks = claim(&app, "worker-1", json!({"wait": "5s"})).await;
    assert_eq!(ids(&tasks), ["urgent"]);
    assert_eq!(tasks[0]["priority"], 1);
}

#[tokio::test]
async fn with_aging_at_1s_a_priority_5_task_waiting_5s_goes_before_fresh_priority_1_work() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--task-priority-aging=1s"]).await;
    register_worker(&app, "worker-1", &["c"], 1).await;
    submit_ok(
        &app,
        json!({"task_id": "patient", "capability": "c", "priority": 5}),
    )
    .await;
    taken_in(&app, "patient").await;
    // Waiting is what is tested: five aging periods must pass.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for n in 0..3 {
        submit_ok(
            &app,
            json!({"task_id": format!("fresh-{n}"), "capability": "c", "priority": 1}),
        )
        .await;
    }
    taken_in(&app, "fresh-2").await;
    let tasks = claim(&app, "worker-1", json!({"wait": "5s"})).await;
    assert_eq!(ids(&tasks), ["patient"]);
}

#[tokio::test]
async fn a_tenants_single_task_behind_another_tenants_1000_is_among_the_first_two_claimed() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "worker-1", &["c"], 2).await;
    for n in 0..1000 {
        submit_ok(
            &app,
            json!({"task_id": format!("a-{n}"), "capability": "c", "tenant": "tenant-a"}),
        )
        .await;
    }
    submit_ok(
        &app,
        json!({"task_id": "b-0", "capability": "c", "tenant": "tenant-b"}),
    )
    .await;
    taken_in(&app, "b-0").await;
    let tasks = claim(&app, "worker-1", json!({"max": 2, "wait": "5s"})).await;
    assert_eq!(ids(&tasks), ["a-0", "b-0"]);
}

#[tokio::test]
async fn with_tenant_weights_a_tenant_gets_its_weight_of_claims_per_turn() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--tenant-weights=tenant-a=3"]).await;
    for n in 0..4 {
        for tenant in ["a", "b"] {
            submit_ok(
                &app,
                json!({"task_id": format!("{tenant}-{n}"), "capability": "c", "tenant": format!("tenant-{tenant}")}),
            )
            .await;
        }
    }
    taken_in(&app, "b-3").await;
    // A record is visible before the dispatcher has put its task back in the queue; claims
    // start once all eight are there.
    eventually(
        Duration::from_secs(20),
        "all eight tasks queued",
        || async {
            let text = app.metrics_text().await;
            text.lines()
                .any(|line| {
                    line.starts_with("acc_tasks_queued{capability=\"c\"") && line.ends_with(" 8")
                })
                .then_some(())
        },
    )
    .await;
    register_worker(&app, "worker-1", &["c"], 10).await;
    let order = ids(&claim_until(&app, "worker-1", 8, "5s").await);
    // Three claims of tenant-a to each one of tenant-b, per turn. The tenants take turns in
    // the order the dispatcher queued their first tasks, which need not be the order they
    // were submitted in: in one CI run b's turn came first, most likely because the writes of
    // two turns in flight completed in the other order.
    let a_first = ["a-0", "a-1", "a-2", "b-0", "a-3", "b-1", "b-2", "b-3"];
    let b_first = ["b-0", "a-0", "a-1", "a-2", "b-1", "a-3", "b-2", "b-3"];
    assert!(
        order == a_first || order == b_first,
        "claimed {order:?}, expected {a_first:?} or {b_first:?}"
    );
}

#[tokio::test]
async fn a_tenant_over_its_queued_cap_gets_429_queue_full_and_other_tenants_are_unaffected() {
    let nats = NatsServer::start();
    let app = TestApp::spawn_with(&nats, &["--task-max-queued-per-tenant=3"]).await;
    for n in 0..3 {
        submit_ok(
            &app,
            json!({"task_id": format!("a-{n}"), "capability": "c", "tenant": "tenant-a"}),
        )
        .await;
    }
    let response = submit(
        &app,
        json!({"task_id": "a-3", "capability": "c", "tenant": "tenant-a"}),
    )
    .await;
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = read(response).await;
    assert_error(status, &body, 429, "QUEUE_FULL");
    assert_eq!(retry_after.unwrap(), "1");
    let submissions = app.js.get_stream("ACC_TASK_SUBMISSIONS").await.unwrap();
    let refused = submissions
        .get_last_raw_message_by_subject("acc.tasks.submitted.a-3")
        .await;
    assert!(
        refused.is_err(),
        "nothing stored for the refused submission"
    );
    let again = json!({"task_id": "a-0", "capability": "c", "tenant": "tenant-a"});
    let (status, again) = read(submit(&app, again).await).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a retry of a stored submission: {again}"
    );
    assert_eq!(again["duplicate"], true);
    submit_ok(
        &app,
        json!({"task_id": "b-0", "capability": "c", "tenant": "tenant-b"}),
    )
    .await;

    // Once one of tenant A's tasks leaves the queue, A may submit again.
    register_worker(&app, "worker-1", &["c"], 1).await;
    taken_in(&app, "b-0").await;
    let claimed = claim(&app, "worker-1", json!({"wait": "5s"})).await;
    assert_eq!(ids(&claimed), ["a-0"]);
    eventually(
        Duration::from_secs(10),
        "tenant A below its cap",
        || async {
            let response = submit(
                &app,
                json!({"task_id": "a-3", "capability": "c", "tenant": "tenant-a"}),
            )
            .await;
            (response.status() == StatusCode::ACCEPTED).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn the_order_of_queued_tasks_is_the_same_after_a_dispatcher_restart() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let tasks = [
        ("a3-0", "tenant-a", 3),
        ("a3-1", "tenant-a", 3),
        ("b3-0", "tenant-b", 3),
        ("a5-0", "tenant-a", 5),
        ("a3-2", "tenant-a", 3),
        ("b3-1", "tenant-b", 3),
        ("b1-0", "tenant-b", 1),
    ];
    for (id, tenant, priority) in tasks {
        submit_ok(
            &app,
            json!({"task_id": id, "capability": "c", "tenant": tenant, "priority": priority}),
        )
        .await;
    }
    taken_in(&app, "b1-0").await;
    app.stop().await;
    let app = TestApp::spawn(&nats).await;
    register_worker(&app, "worker-1", &["c"], 10).await;
    let order = ids(&claim_until(&app, "worker-1", tasks.len(), "5s").await);
    assert_eq!(
        order,
        ["b1-0", "a3-0", "b3-0", "a3-1", "b3-1", "a3-2", "a5-0"]
    );
}

#[tokio::test]
async fn the_order_of_queued_tasks_is_the_same_after_a_dispatcher_failover() {
    let nats = NatsServer::start();
    let acting = TestApp::spawn(&nats).await;
    let kv = acting.js.get_key_value("acc_tasks").await.unwrap();
    // The first replica holds the dispatcher lease before the standby starts.
    eventually(
        Duration::from_secs(10),
        "the first replica acting",
        || async {
            let entry = kv.get("lease.dispatcher").await.ok().flatten()?;
            let lease: Value = serde_json::from_slice(&entry).ok()?;
            lease["holder"]
                .as_str()
                .is_some_and(|h| !h.is_empty())
                .then_some(())
        },
    )
    .await;
    let standby = TestApp::spawn(&nats).await;
    let tasks = [
        ("a3-0", "tenant-a", 3),
        ("b5-0", "tenant-b", 5),
        ("a3-1", "tenant-a", 3),
        ("a2-0", "tenant-a", 2),
        ("b3-0", "tenant-b", 3),
        ("c3-0", "tenant-c", 3),
        ("b2-0", "tenant-b", 2),
    ];
    for (id, tenant, priority) in tasks {
        submit_ok(
            &standby,
            json!({"task_id": id, "capability": "c", "tenant": tenant, "priority": priority}),
        )
        .await;
    }
    taken_in(&standby, "b2-0").await;
    acting.stop().await;
    register_worker(&standby, "worker-1", &["c"], 10).await;
    let order = ids(&claim_until(&standby, "worker-1", tasks.len(), "5s").await);
    assert_eq!(
        order,
        ["a2-0", "b2-0", "a3-0", "b3-0", "c3-0", "a3-1", "b5-0"]
    );
}
