//! A real authorization server for the tests: oidc-provider (tests/oidc/server.mjs, installed by
//! `scripts/lib.sh ensure_oidc_provider`) on a loopback port, issuing opaque client-credentials
//! tokens with introspection and revocation. And [`Gate`], a TCP relay in front of it that a test
//! closes and reopens to play an outage of the server without losing its tokens.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The client secret of every client of the test server (a test value, not a secret).
pub const CLIENT_SECRET: &str = "test-only-client-secret-0123456789abcdef";

pub struct AuthServer {
    child: Child,
    pub addr: SocketAddr,
    http: reqwest::Client,
}

fn oidc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

impl AuthServer {
    /// Starts the server and waits (bounded) until it listens.
    pub fn start() -> Self {
        let dir = oidc_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed: run `source scripts/lib.sh && ensure_oidc_provider` (scripts/test does)"
        );
        let node = std::env::var("NODE_BIN").unwrap_or_else(|_| "node".into());
        let mut child = Command::new(node)
            .arg("server.mjs")
            .current_dir(&dir)
            .env("OIDC_CLIENT_SECRET", CLIENT_SECRET)
            .env("NODE_NO_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (Node.js 20 or later)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining: a closed pipe would kill the server on its next write (EPIPE).
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the authorization server starts within 30 s");
        let port = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .unwrap_or_else(|| panic!("the authorization server printed {line:?}"));
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port as u16)),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A client-credentials token of `client` with `scope` (space-separated; empty: none).
    pub async fn token(&self, client: &str, scope: &str) -> String {
        self.token_for(client, scope, None).await
    }

    /// Like [`Self::token`], for the resource server `resource` (`urn:other:api`: another
    /// audience than ours).
    pub async fn token_for(&self, client: &str, scope: &str, resource: Option<&str>) -> String {
        let mut form = vec![("grant_type", "client_credentials")];
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        if let Some(resource) = resource {
            form.push(("resource", resource));
        }
        let response = self
            .http
            .post(self.url("/token"))
            .basic_auth(client, Some(CLIENT_SECRET))
            .form(&form)
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token: {body}"))
            .to_owned()
    }

    /// Revokes `token` (RFC 7009).
    pub async fn revoke(&self, token: &str) {
        let response = self
            .http
            .post(self.url("/token/revocation"))
            .basic_auth("auto-com-center", Some(CLIENT_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// Introspection requests the server has served.
    pub async fn introspections(&self) -> u64 {
        let body: Value = self
            .http
            .get(self.url("/__test/introspections"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["count"].as_u64().unwrap()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay to `upstream` on a port of its own, which a test can close (connections refused,
/// open ones cut) and reopen on the same port.
pub struct Gate {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    relays: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl Gate {
    pub async fn open(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Self {
            addr,
            upstream,
            relays: Arc::new(Mutex::new(None)),
        };
        gate.serve(listener);
        gate
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let mut set = JoinSet::new();
        let relays = self.relays.clone();
        set.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let relay = async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                };
                // Spawned into the gate's set, so closing the gate cuts open connections too.
                if let Some(set) = relays.lock().unwrap().as_mut() {
                    set.spawn(relay);
                }
            }
        });
        let previous = self.relays.lock().unwrap().replace(set);
        assert!(previous.is_none(), "the gate is open already");
    }

    /// Closes the port and cuts every open connection: the server is unreachable.
    pub fn close(&self) {
        if let Some(mut set) = self.relays.lock().unwrap().take() {
            set.abort_all();
        }
    }

    /// Reopens the same port.
    pub async fn reopen(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("cannot reopen {}: {err}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// The introspection endpoint through the gate.
    pub fn introspection_url(&self) -> String {
        format!("http://{}/token/introspection", self.addr)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
    }
}

/// The flags of an app that introspects through `gate`, plus `extra`.
pub fn introspection_flags(gate: &Gate, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--auth-mode=both".to_owned(),
        format!("--introspection-url={}", gate.introspection_url()),
        "--introspection-client-id=auto-com-center".to_owned(),
        format!("--introspection-client-secret={CLIENT_SECRET}"),
        "--introspection-timeout=1s".to_owned(),
    ];
    flags.extend(extra.iter().map(|f| (*f).to_owned()));
    flags
}
