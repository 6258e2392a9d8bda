//! Measures what each durability mode costs: one publisher storing messages one at a time and
//! awaiting each JetStream ack, against a fresh nats-server with `sync_interval: always` (fsync)
//! and with the default interval. The durability figures in docs/operations.md come from this.
//!
//! ```sh
//! cargo run --release --example ack_rate -- 2000
//! ```

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: u64 = std::env::args().nth(1).map_or(Ok(2000), |n| n.parse())?;
    let binary = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    for (mode, sync) in [("fsync", "always"), ("interval", "2m")] {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?}, sync_interval: {sync} }}\n",
                dir.path().join("js")
            ),
        )?;
        let mut server = std::process::Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = async_nats::connect(format!("127.0.0.1:{port}")).await?;
        let js = jetstream::new(client);
        js.create_stream(stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let payload = bytes::Bytes::from(vec![b'x'; 256]);
        let started = Instant::now();
        for _ in 0..count {
            js.publish("probe", payload.clone()).await?.await?;
        }
        let elapsed = started.elapsed();
        println!(
            "{mode:>8}: {count} sequential publish-and-ack of 256 B in {:.2} s = {:.0} writes/s, {:.3} ms each",
            elapsed.as_secs_f64(),
            count as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1000.0 / count as f64
        );
        let _ = server.kill();
        let _ = server.wait();
    }
    Ok(())
}
