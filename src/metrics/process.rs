//! The usual process metrics, read from `/proc/self` on each scrape (Linux; elsewhere they are
//! left out rather than reported as zero).

/// Figures of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessFigures {
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    /// Unix time the process started, in seconds.
    pub start_time_seconds: f64,
}

/// Reads the figures of this process; `None` where `/proc` is not available.
pub fn read() -> Option<ProcessFigures> {
    read_at("/proc/self")
}

/// Reads the figures of process `pid` (the benchmarks read a bridge's or its nats-server's);
/// `None` where `/proc` is not available or there is no such process.
pub fn read_pid(pid: u32) -> Option<ProcessFigures> {
    read_at(&format!("/proc/{pid}"))
}

fn read_at(dir: &str) -> Option<ProcessFigures> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields we want follow its closing paren.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): field n is at index n - 3.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    })?;
    let open_fds = std::fs::read_dir(format!("{dir}/fd"))
        .map(|dir| dir.count() as u64)
        .unwrap_or(0);
    let max_fds = std::fs::read_to_string(format!("{dir}/limits"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    Some(ProcessFigures {
        resident_memory_bytes: field(24)? * page,
        virtual_memory_bytes: field(23)?,
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        open_fds,
        max_fds,
        start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_figures() {
        let figures = super::read().expect("running on Linux");
        assert!(figures.resident_memory_bytes > 0);
        assert!(figures.open_fds > 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            figures.start_time_seconds <= now + 1.0 && figures.start_time_seconds > now - 86_400.0
        );
    }

    #[test]
    fn a_pid_reads_as_that_process() {
        let own = super::read_pid(std::process::id()).expect("this process by its pid");
        assert!(own.resident_memory_bytes > 0);
        assert_eq!(
            own.start_time_seconds,
            super::read().expect("this process").start_time_seconds
        );
        assert_eq!(super::read_pid(u32::MAX), None, "no such process");
    }
}
