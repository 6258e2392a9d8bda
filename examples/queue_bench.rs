//! The cost of one claim on the dispatcher's [`TaskQueue`] as a function of the backlog: the
//! queue is filled with `queued` tasks (5 levels, 10 tenants, one capability, one second apart so
//! aging is in play), then each operation claims one task and queues a fresh one, so the backlog
//! stays the same size. Prints one CSV line: `queued,ops,ns_per_claim`.
//!
//! ```sh
//! cargo run --release --example queue_bench -- 1000 200000
//! cargo run --release --example queue_bench -- 100000 200000
//! ```
//!
//! Under `valgrind --tool=callgrind`, the difference in instructions between `ops` and `0`
//! operations, divided by `ops`, is the instruction count of one claim (load-tests/run-sched-bench
//! does this): a figure a busy machine does not move.

use std::hint::black_box;
use std::time::{Duration, Instant};

use auto_com_center::domain::TaskId;
use auto_com_center::tasks::queue::{QueueSettings, TaskQueue, Waiting};
use chrono::{DateTime, Utc};

fn task(n: u64, start: DateTime<Utc>) -> Waiting {
    Waiting {
        task_id: TaskId::parse(&format!("t{n}")).expect("a valid id"),
        capability: "work".to_owned(),
        priority: (n % 5) as u8 + 1,
        tenant: format!("tenant-{}", n % 10),
        queued_at: start + chrono::Duration::milliseconds(n as i64),
        seq: n,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let queued: u64 = args.next().map_or(1000, |a| a.parse().expect("queued"));
    let ops: u64 = args.next().map_or(100_000, |a| a.parse().expect("ops"));
    let start = DateTime::from_timestamp(1_700_000_000, 0).expect("a time");
    let mut queue = TaskQueue::new(QueueSettings {
        aging: Duration::from_secs(30),
        ..QueueSettings::default()
    });
    for n in 0..queued {
        queue.push(task(n, start));
    }
    let capabilities = vec!["work".to_owned()];
    // The clock of the claims: the backlog spans `queued` ms, the claims run a minute later, so
    // the older levels are aged.
    let now: DateTime<Utc> = start
        + chrono::Duration::milliseconds((queued + ops) as i64)
        + chrono::Duration::seconds(60);
    let began = Instant::now();
    for n in queued..queued + ops {
        let taken = queue.pop_for_at(&capabilities, now, |_| true);
        black_box(&taken);
        queue.push(task(n, start));
    }
    let elapsed = began.elapsed();
    assert_eq!(queue.len() as u64, queued);
    let ns = if ops == 0 {
        0.0
    } else {
        elapsed.as_nanos() as f64 / ops as f64
    };
    println!("{queued},{ops},{ns:.1}");
}
