//! The admission fuzz harness, shared by the `cargo fuzz` target (`fuzz_targets/admission.rs`)
//! and the stable smoke test that CI runs (`tests/api/fuzz_smoke.rs`).
//!
//! One input drives either token verification or the whole admission path of one call, exactly
//! as the doors call it: JSON object → validation → identity binding → stamping → dedupe id →
//! publish. The bus is gone on purpose (a nats-server is started only to open the stream handles,
//! then killed), so an input that passes validation ends in a 503 (`BUS_UNAVAILABLE`) without
//! waiting; everything else must be a 4xx. Anything else — a panic,
//! a 500, a 200 without a bus — is a finding.
//!
//! Input layout: byte 0 selects the mode (bit 7: token; bit 6: send the head as an
//! Idempotency-Key; low two bits: register, heartbeat, task callback, event); the bytes up to the
//! first newline are the head (task id or key); the rest is the body.

use std::sync::OnceLock;
use std::time::Duration;

use auto_com_center::admission::{Admission, Call};
use auto_com_center::auth::{self, AuthSettings, Caller, Secret, Verifier};
use auto_com_center::bus::Publisher;
use auto_com_center::contract::Refusal;
use auto_com_center::directory::Directory;
use auto_com_center::domain::AgentId;
use serde_json::Value;

struct World {
    runtime: tokio::runtime::Runtime,
    admission: Admission,
    verifier: Verifier,
    caller: Caller,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (admission, verifier, caller) = runtime.block_on(async {
            let (client, agents) = vanished_bus().await;
            let publisher = Publisher::new(client, Duration::from_millis(5));
            let directory = Directory::new(agents, Duration::from_millis(1));
            let secret = Secret::new("fuzz-secret-0123456789-0123456789-abcdef");
            let settings = AuthSettings {
                mode: auth::AuthMode::Jwt,
                secret: None,
                introspection: None,
                require_scopes: false,
                leeway: Duration::from_secs(5),
                max_token_bytes: 8192,
                max_lifetime: Duration::from_secs(86_400),
            };
            let verifier = Verifier::new(&secret, &settings);
            let token = auth::mint(
                &secret,
                &AgentId::parse("agent-1").expect("valid id"),
                "",
                Duration::from_secs(3600),
            );
            let caller = verifier.verify(&token).expect("a minted token verifies");
            (Admission::new(publisher, directory), verifier, caller)
        });
        World {
            runtime,
            admission,
            verifier,
            caller,
        }
    })
}

/// A client and an agents-stream handle whose server has since been killed.
async fn vanished_bus() -> (async_nats::Client, async_nats::jetstream::stream::Stream) {
    let binary = std::env::var_os("NATS_SERVER_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join("nats-server"))
                .find(|p| p.is_file())
        })
        .expect("nats-server on PATH or NATS_SERVER_BIN");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let store = std::env::temp_dir().join(format!("acc-fuzz-{}-{port}", std::process::id()));
    let mut server = std::process::Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    let url = format!("127.0.0.1:{port}");
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url.as_str())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    let agents = loop {
        let created = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "ACC_AGENTS".into(),
                subjects: vec!["acc.agents.>".into()],
                ..Default::default()
            })
            .await;
        if let Ok(stream) = created {
            break stream;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&store);
    while client.connection_state() == async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (client, agents)
}

/// Runs one input; panics on a finding.
pub fn run(data: &[u8]) {
    let world = world();
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 0x80 != 0 {
        if let Err(err) = world.verifier.verify_header(Some(rest)) {
            let status = Refusal::from(err).status();
            assert_eq!(status, 401, "a refused token is a 401");
        }
        return;
    }
    let (head, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&rest[..0], rest),
    };
    let head = String::from_utf8_lossy(head);
    // The HTTP door refuses anything but a JSON object before admission (400 INVALID_JSON).
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let call = match selector & 0x03 {
        0 => Call::Register,
        1 => Call::Heartbeat,
        2 => Call::TaskResult {
            task_id: &head,
            stored: None,
        },
        _ => Call::Event,
    };
    let key = (selector & 0x40 != 0).then_some(&*head);
    let outcome = world.runtime.block_on(world.admission.admit(
        call,
        &world.caller,
        body.clone(),
        key,
    ));
    match outcome {
        Ok(answer) => panic!("admitted without a bus: {answer:?}"),
        Err(err) => {
            let status = err.status();
            assert!(
                (400..500).contains(&status) || status == 503,
                "status {status} ({}) for {body:?}",
                err.code()
            );
            let envelope = err.body();
            assert_eq!(envelope["success"], false);
        }
    }
}
