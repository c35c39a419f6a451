//! CPU time the processes under test spend while a scenario's load runs,
//! read from Linux's `/proc`: the server (`--server-pid`) and, with
//! `--store-process NAME[,NAME]`, every process of those names (Postgres runs
//! one per connection besides its background writers; a design on Redis and
//! Postgres names both). Divided by the requests answered in the same window,
//! it is what a request costs each of them: the figure to compare between two
//! builds when the machine's speed drifts from one run to the next, as a
//! shared machine's does.
//!
//! A store process that exits during the window takes its time with it; one
//! that starts in it counts from zero. Times are in the kernel's clock ticks
//! (10 ms on Linux), so a run of a few seconds at a core's worth of load is
//! measured to a fraction of a percent.

use std::time::Duration;

/// CPU time spent by the watched processes over a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spent {
    pub server: Option<Duration>,
    pub store: Option<Duration>,
}

impl Spent {
    /// Microseconds of CPU per request, for each process watched.
    pub fn per_request_us(&self, requests: u64) -> (Option<f64>, Option<f64>) {
        let per = |spent: Option<Duration>| {
            spent.filter(|_| requests > 0).map(|spent| spent.as_secs_f64() * 1e6 / requests as f64)
        };
        (per(self.server), per(self.store))
    }
}

/// A window opened by `start` and closed by `stop`.
pub struct Watch {
    server: Option<u32>,
    store: Option<String>,
    started: (Option<u64>, Option<u64>),
}

impl Watch {
    /// `None` when there is nothing to watch. `store`: process names, comma-separated.
    pub fn start(server: Option<u32>, store: Option<&str>) -> Option<Watch> {
        if server.is_none() && store.is_none() {
            return None;
        }
        let store = store.map(str::to_owned);
        let started = (server.and_then(ticks_of_process), store.as_deref().map(ticks_of_processes_named));
        Some(Watch { server, store, started })
    }

    pub fn stop(self) -> Spent {
        let ended = (self.server.and_then(ticks_of_process), self.store.as_deref().map(ticks_of_processes_named));
        let spent = |before: Option<u64>, after: Option<u64>| Some(ticks(after?.saturating_sub(before?)));
        Spent { server: spent(self.started.0, ended.0), store: spent(self.started.1, ended.1) }
    }
}

fn ticks(count: u64) -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = if per_second > 0 { per_second as u64 } else { 100 };
    Duration::from_nanos(count.saturating_mul(1_000_000_000) / per_second)
}

/// User and system time of a process (all its threads), in clock ticks.
fn ticks_of_process(pid: u32) -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `utime + stime` from the text of `/proc/PID/stat`: the 14th and 15th
/// fields, counted from after the command's name, which may hold spaces and
/// parentheses of its own.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is the 3rd field (state); utime is the 14th.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The ticks of every process whose name (`/proc/PID/comm`) is one of
/// `names` (comma-separated).
fn ticks_of_processes_named(names: &str) -> u64 {
    let names: Vec<&str> = names.split(',').filter(|name| !name.is_empty()).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| names.contains(&comm.trim_end()))
        })
        .filter_map(ticks_of_process)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticks_are_read_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_stat_ticks("4242 (short) S 1"), None);
    }

    /// This process's CPU time from the C library's clock, to check the
    /// watch against.
    fn process_cpu_time() -> Duration {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid timespec for the call to fill.
        assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) }, 0);
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    #[test]
    fn the_watch_agrees_with_the_process_clock() {
        let watch = Watch::start(Some(std::process::id()), None).expect("something to watch");
        let from = process_cpu_time();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut spin = 0u64;
        while process_cpu_time() - from < Duration::from_millis(300) {
            assert!(std::time::Instant::now() < deadline, "300 ms of CPU within 10 s");
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let spent = watch.stop();
        let clock = process_cpu_time() - from;
        let server = spent.server.expect("this process is readable");
        let tick = ticks(1);
        assert!(
            server + 2 * tick >= clock && server <= clock + 2 * tick,
            "the watch saw {server:?}, the process clock {clock:?} (ticks of {tick:?})"
        );
        assert_eq!(spent.store, None);
        let (server_us, store_us) = spent.per_request_us(1_000);
        assert!(server_us.is_some_and(|us| (us - server.as_secs_f64() * 1e3).abs() < 1e-6), "{server_us:?}");
        assert_eq!(store_us, None);
        assert_eq!(spent.per_request_us(0), (None, None), "no requests, no figure");
    }
}
